from ternlm.cli import main

raise SystemExit(main())
