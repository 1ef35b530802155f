"""`python -m mmjax.train`: the research convention's name for `mmjax train`
(mmjax.tools.train, where the arguments are described)."""

import sys

from mmjax.tools.train import main

if __name__ == "__main__":
    from mmjax.runtime.host_memory import tune_host_memory

    tune_host_memory()  # Before JAX starts; may restart this process once.
    sys.exit(main())
