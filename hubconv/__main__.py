from hubconv.cli import main

raise SystemExit(main())
