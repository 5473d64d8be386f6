"""Preloaded by the forkserver of ``overhead.py``'s memory children: imports every framework
and runs every contender once on a micro MLP, so that each child, forked from this warmed
server, measures the memory of its training run rather than first-use initialisation.

Importing it runs the warm-up (that is its purpose); nothing else imports it.
"""

from __future__ import annotations

import overhead

overhead.setup_process()
overhead.warm_up(overhead.CONTENDERS)
