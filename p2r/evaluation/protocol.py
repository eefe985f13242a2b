"""What every evaluation protocol provides, and the registry that builds one per benchmark.

A protocol is one complete way of scoring a benchmark: the prompt, the decoding settings, how an
output is read and scored, and how scores become the published figure. p2r has three:

- ``video_r1``: Video-R1's ``src/eval_bench.py`` (:mod:`p2r.evaluation.video_r1`), closest to the
  protocol of VideoP2R's Table 1;
- ``lmms_eval``: lmms-eval 0.7.3's task definitions (:mod:`p2r.evaluation.lmms_eval`);
- ``p2r``: p2r's own lenient reading (:mod:`p2r.evaluation.scoring`), not comparable to either.

Each is a "rules" object for one benchmark with ``includes(doc)``, ``prompt(doc)``,
``generation(doc)``, ``category(doc)``, ``score(doc, output)`` and ``aggregate(rows)``, where
``doc`` is the protocol's record (a :class:`~p2r.data.records.VideoRecord` in Video-R1's layout for
``video_r1`` and ``p2r``, a :class:`~p2r.evaluation.lmms_eval.NativeRow` for ``lmms_eval``) and
``rows`` are predictions lines (``score``, ``metric``, ``category``, ``parsed``, ``details``).
``aggregate`` returns ``figure`` (in the reference's units), ``units`` (``fraction`` or
``percent``), ``metric`` (the reference's name for the figure) and ``categories``, plus counts
the protocol reports.
"""

from __future__ import annotations

from typing import Any, Literal

from p2r.evaluation.lmms_eval import LmmsEvalRules
from p2r.evaluation.scoring import LenientRules
from p2r.evaluation.video_r1 import VideoR1Rules

ProtocolName = Literal["video_r1", "lmms_eval", "p2r"]
PROTOCOLS: tuple[str, ...] = ("video_r1", "lmms_eval", "p2r")


def make_rules(protocol: str, benchmark: str, **options: Any) -> Any:
    """The rules of ``benchmark`` under ``protocol``; ``options`` go to the protocol's rules class
    (``template`` for video_r1 and p2r, ``ask`` for lmms_eval, ``mra_convention`` for p2r)."""
    if protocol == "video_r1":
        return VideoR1Rules(benchmark, **options)
    if protocol == "lmms_eval":
        return LmmsEvalRules(benchmark, **options)
    if protocol == "p2r":
        return LenientRules(benchmark, **options)
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
