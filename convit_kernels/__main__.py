"""`python -m convit_kernels`: the console script's command line, Ctrl-C one line and status 130 (the launcher).

Python imports the package (and torch with it) before this module runs, so a Ctrl-C during that import
still ends in Python's traceback; the console script (convit_kernels_launcher) covers that import too.
"""

from convit_kernels_launcher import main

raise SystemExit(main())
