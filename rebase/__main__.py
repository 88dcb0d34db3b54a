from rebase.cli import main

raise SystemExit(main())
