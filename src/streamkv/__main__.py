from streamkv.cli import main

raise SystemExit(main())
