from lavender.cli import main

raise SystemExit(main())
