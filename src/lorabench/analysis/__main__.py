"""`python -m lorabench.analysis <sweep dir(s) | wandb:entity/project[/group]> --out DIR` = lorabench-report."""

import sys

from lorabench.analysis.report import main

sys.exit(main())
