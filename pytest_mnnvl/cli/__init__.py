"""``python -m pytest_mnnvl explain|predict|repro PLAN.json``: the combinePayloadOffset tools.

One module per concept: :mod:`.inputs` (plan files and arguments, errors with exit status 2),
:mod:`.policy` (which growth policy a ``--manager`` spec stands for), :mod:`.analysis` (the plan
walked through that policy with FlashInfer's host-check arithmetic), :mod:`.render` (tables and
JSON), :mod:`.repro` / :mod:`.repro_rank` (the plan run on a real rank world) and :mod:`.main`
(argument parsing and exit statuses). Nothing here imports torch or FlashInfer except ``repro``'s
rank side, inside rank processes.
"""

from __future__ import annotations
