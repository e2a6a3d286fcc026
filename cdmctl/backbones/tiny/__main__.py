"""`python -m cdmctl.backbones.tiny FAMILY DIR`: write a tiny random-weight pipeline of a family."""

from cdmctl.backbones.tiny import main

raise SystemExit(main())
