"""Score a perception judge against human labels: agreement, Cohen's kappa, the confusion table.

    python tools/judge_agreement.py LABELS.jsonl --judge rule
    python tools/judge_agreement.py LABELS.jsonl --judge configs/pagrpo.yaml --out runs/judge_agreement.json
    python tools/judge_agreement.py LABELS.jsonl --out agreement.json --judge \\
        '{"class_path": "callbacks.rewards.judges.OpenAIChatJudge", "init_args": {"base_url": "http://127.0.0.1:8000/v1", "model": "meta-llama/Llama-3.1-8B-Instruct"}}'

The VideoP2R paper picks its perception judge by its agreement with 200 human labels (Table 4:
Llama-3.1-8B 82 %, 70B 88 %, 405B 91 %, Claude 3.7 95 %); this tool measures that figure for any
judge you can run, so you can weigh agreement against cost.

Each line of LABELS.jsonl is one JSON object: ``question`` (str), ``options`` (list of str, may be
empty or absent), ``answer`` (the correct answer, text or option letter), ``observation`` (the text
the judge reads; may be empty), ``label`` (the human verdict, true/false or 1/0: "the correct answer
can be deduced from the observation alone"), and optionally ``id`` (default: the line number) and
``facts`` (an object; ``facts["evidence"]`` is what the rule judge checks). Other keys are ignored.
Blank lines are skipped; a malformed line stops the tool with ``FILE:LINE`` and the field at fault,
unless ``--skip-bad`` is given (then it is reported and left out).

The judge is asked exactly what PerceptionJudgeReward asks it in training: for multiple choice the
question carries its options ("Options:\\nA. ...") and the answer is the letter with its option text
("B. green"). Here every line goes to the configured judge (the reward's ``use_facts`` routing to
the rule judge does not apply). ``--judge`` is ``rule`` (RuleBasedJudge), a YAML/JSON file or inline
JSON holding ``{class_path, init_args}`` as in our configs, or a training config such as
configs/pagrpo.yaml (its PerceptionJudgeReward's ``judge`` is used).

Prints the number of lines judged, the agreement with its 95 % Wilson interval, Cohen's kappa,
the confusion table (judge rows, human columns) and the failures: lines the judge gave no verdict
for (server error, timeout, unreadable reply, no ``facts["evidence"]`` for the rule judge). Failures
are left out of agreement and kappa and counted and listed by id on their own (with a warning when
they are over 10 % of the lines; the exit status is 1 when no line got a verdict). ``--out`` writes
these figures and every line's verdict (id, line, label, verdict or null, agree, error) as JSON.

Cohen's kappa is ``(p_o - p_e) / (1 - p_e)``, with ``p_e`` from the judge's and the humans' yes
rates. When ``p_e == 1`` (judge and humans gave the same single verdict to every line) kappa is
0/0: we report it as undefined (null in JSON, NaN in Python), as scikit-learn does, rather than 1:
such a label set cannot tell a judge that discriminates from one that always says the same.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from statistics import NormalDist
from typing import Any, NamedTuple

import yaml

# ---- statistics -----------------------------------------------------------------------------------


class Confusion(NamedTuple):
    """Counts of (judge verdict, human label) pairs; the first word is the judge's."""

    judge_yes_human_yes: int
    judge_yes_human_no: int
    judge_no_human_yes: int
    judge_no_human_no: int

    @property
    def n(self) -> int:
        return sum(self)

    @property
    def agreements(self) -> int:
        return self.judge_yes_human_yes + self.judge_no_human_no

    @property
    def judge_yes(self) -> int:
        return self.judge_yes_human_yes + self.judge_yes_human_no

    @property
    def human_yes(self) -> int:
        return self.judge_yes_human_yes + self.judge_no_human_yes


def confusion_table(judge: list[bool], human: list[bool]) -> Confusion:
    """Count the four (judge, human) combinations of paired verdicts.

    >>> confusion_table([True, True, False, False], [True, False, True, True])
    Confusion(judge_yes_human_yes=1, judge_yes_human_no=1, judge_no_human_yes=2, judge_no_human_no=0)
    """
    if len(judge) != len(human):
        raise ValueError(f"confusion_table: {len(judge)} judge verdicts for {len(human)} human labels")
    pairs = list(zip(judge, human))
    return Confusion(*(sum(1 for p in pairs if p == want) for want in ((True, True), (True, False), (False, True), (False, False))))


def cohen_kappa(table: Confusion) -> float:
    """Cohen's kappa of a 2x2 table: ``(p_o - p_e) / (1 - p_e)``, ``p_e`` from the marginals.

    NaN when undefined: no pairs, or ``p_e == 1`` (both raters gave one and the same verdict to
    every item, so kappa is 0/0; scikit-learn's ``cohen_kappa_score`` gives NaN there too). The
    ``p_e == 1`` test is exact, on integer counts.

    >>> cohen_kappa(Confusion(20, 5, 10, 15))  # p_o = 0.7, p_e = 0.5
    0.4
    >>> math.isnan(cohen_kappa(Confusion(9, 0, 0, 0)))
    True
    """
    n = table.n
    judge_yes, human_yes = table.judge_yes, table.human_yes
    chance = judge_yes * human_yes + (n - judge_yes) * (n - human_yes)  # p_e * n^2
    if n == 0 or chance == n * n:
        return math.nan
    return (table.agreements * n - chance) / (n * n - chance)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``; (NaN, NaN) when ``n == 0``.

    >>> [round(x, 4) for x in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    """
    if n == 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: {successes} successes out of {n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


# ---- labels -----------------------------------------------------------------------------------------


class LabelError(ValueError):
    """A malformed line of a labels file; the message starts with ``FILE:LINE:``."""


class Label(NamedTuple):
    """One human-labelled line."""

    id: str
    line: int
    question: str
    options: list[str]
    answer: str
    observation: str
    label: bool
    facts: dict[str, Any] | None


def parse_label(obj: Any, line: int, where: str) -> Label:
    """One labels-file object as a :class:`Label`; :class:`LabelError` names the field at fault."""
    if not isinstance(obj, dict):
        raise LabelError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    for name in ("question", "answer", "observation", "label"):
        if name not in obj:
            raise LabelError(f"{where}: missing field {name!r}")
    question, observation, answer = obj["question"], obj["observation"], obj["answer"]
    if not isinstance(question, str) or not question.strip():
        raise LabelError(f"{where}: field 'question' must be a non-empty string, got {question!r}")
    if not isinstance(observation, str):
        raise LabelError(f"{where}: field 'observation' must be a string (may be empty), got {observation!r}")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise LabelError(f"{where}: field 'answer' must be a non-empty string (or a number), got {obj['answer']!r}")
    options = obj.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise LabelError(f"{where}: field 'options' must be a list of strings, got {obj.get('options')!r}")
    label = obj["label"]
    if isinstance(label, bool):
        verdict = label
    elif isinstance(label, int) and label in (0, 1):
        verdict = bool(label)
    else:
        raise LabelError(f"{where}: field 'label' must be true/false or 1/0, got {label!r}")
    facts = obj.get("facts")
    if facts is not None and not isinstance(facts, dict):
        raise LabelError(f"{where}: field 'facts' must be an object, got {facts!r}")
    ident = obj.get("id", str(line))
    if isinstance(ident, bool) or not isinstance(ident, (str, int)) or str(ident) == "":
        raise LabelError(f"{where}: field 'id' must be a non-empty string or an integer, got {ident!r}")
    return Label(str(ident), line, question, options, answer, observation, verdict, facts)


def read_labels(path: Path, skip_bad: bool = False) -> tuple[list[Label], list[str]]:
    """(labels, errors of the skipped lines); without ``skip_bad`` the first bad line raises :class:`LabelError`.

    Blank lines are not labels and are passed over. Two lines with one id are an error: the
    report lists disagreements and failures by id.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LabelError(f"{path}: cannot read the labels file: {err}") from None
    labels, skipped, seen = [], [], {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                raise LabelError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            label = parse_label(obj, number, where)
            if label.id in seen:
                raise LabelError(f"{where}: field 'id' {label.id!r} already used on line {seen[label.id]}")
        except LabelError as err:
            if not skip_bad:
                raise
            skipped.append(str(err))
            continue
        seen[label.id] = number
        labels.append(label)
    return labels, skipped


# ---- the judge ----------------------------------------------------------------------------------------

JUDGE_REWARD = "PerceptionJudgeReward"


def _import(class_path: str) -> Any:
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"class_path {class_path!r} is not a dotted path (e.g. callbacks.rewards.judges.RuleBasedJudge)")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {class_path!r}: {err}") from None


def instantiate(node: Any) -> Any:
    """Build ``{class_path, init_args}`` as LightningCLI would: the class called with its init_args
    (values that are themselves ``{class_path, ...}`` nodes are built first)."""
    if isinstance(node, dict) and "class_path" in node:
        unknown = set(node) - {"class_path", "init_args"}
        if unknown:
            raise ValueError(f"unexpected keys {sorted(unknown)} next to class_path {node['class_path']!r}")
        init_args = node.get("init_args") or {}
        if not isinstance(init_args, dict):
            raise ValueError(f"init_args of {node['class_path']!r} must be a mapping, got {init_args!r}")
        cls = _import(str(node["class_path"]))
        try:
            return cls(**{k: instantiate(v) for k, v in init_args.items()})
        except TypeError as err:
            raise ValueError(f"{node['class_path']}: {err}") from None
    if isinstance(node, list):
        return [instantiate(v) for v in node]
    return node


def _reward_judges(node: Any) -> list[Any]:
    """The ``judge`` nodes of every PerceptionJudgeReward in a (training) config."""
    found = []
    if isinstance(node, dict):
        if str(node.get("class_path", "")).rsplit(".", 1)[-1] == JUDGE_REWARD and isinstance(node.get("init_args"), dict):
            if "judge" in node["init_args"]:
                found.append(node["init_args"]["judge"])
        for value in node.values():
            found += _reward_judges(value)
    elif isinstance(node, list):
        for value in node:
            found += _reward_judges(value)
    return found


def judge_node(spec: str) -> Any:
    """The ``{class_path, init_args}`` node that ``--judge`` names (see the module docstring)."""
    if spec == "rule":
        return {"class_path": "callbacks.rewards.judges.RuleBasedJudge"}
    source = spec
    if not spec.lstrip().startswith(("{", "[")):  # inline JSON is never a file name (and may be too long for one)
        path = Path(spec)
        try:
            if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
                source = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"cannot read {spec}: {err}") from None
    try:
        node = yaml.safe_load(source)  # YAML reads JSON too
    except yaml.YAMLError as err:
        raise ValueError(f"not valid YAML/JSON: {err}") from None
    if isinstance(node, str) and "." in node and not any(c.isspace() for c in node):
        return {"class_path": node}  # a bare class path
    if isinstance(node, dict) and "class_path" in node and str(node["class_path"]).rsplit(".", 1)[-1] != JUDGE_REWARD:
        return node
    if isinstance(node, dict) and isinstance(node.get("judge"), dict) and "class_path" in node["judge"]:
        return node["judge"]
    found = _reward_judges(node)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ValueError(f"the config has {len(found)} {JUDGE_REWARD} callbacks; "
                         "give the judge's own {class_path, init_args}")
    raise ValueError("expected 'rule', a {class_path, init_args} mapping (file or inline JSON), "
                     f"or a config with a {JUDGE_REWARD}; got {spec!r}")


def load_judge(spec: str) -> Any:
    """The judge ``--judge`` names, built; raises ``ValueError`` with the reason."""
    judge = instantiate(judge_node(spec))
    if not callable(getattr(judge, "judge", None)):
        raise ValueError(f"{type(judge).__name__} has no judge(requests) method: not a perception judge")
    return judge


def describe(judge: Any) -> str:
    """The judge's own repr when it defines one (OpenAIChatJudge: server and model, never a key), else its class."""
    if type(judge).__repr__ is not object.__repr__:
        return repr(judge)
    return f"{type(judge).__module__}.{type(judge).__qualname__}"


def requests_of(labels: list[Label]) -> list[Any]:
    """The JudgeRequests PerceptionJudgeReward would send for these lines (same question and answer text)."""
    from callbacks.reward_callbacks import judge_answer_text
    from callbacks.rewards.judges import JudgeRequest
    from p2r.data.prompts import question_with_options  # what build_question gives PerceptionJudgeReward in training

    requests = []
    for label in labels:
        kind = "multiple choice" if label.options else "free-form"
        question = question_with_options(label.question, label.options)
        answer = judge_answer_text({"answer": label.answer, "options": label.options, "problem_type": kind})
        requests.append(JudgeRequest(question=question, answer=answer, observation=label.observation, facts=label.facts))
    return requests


Verdict = tuple[bool | None, str | None]  # (judge verdict or None, failure reason or None)


def run_judge(judge: Any, requests: list[Any], batch_size: int, progress: bool | None) -> list[Verdict]:
    """(verdict or None, error or None) per request, judged ``batch_size`` at a time so the bar moves.

    A result whose ``score`` is None is a failure (its ``error`` says why); a judge that raises
    or returns the wrong number of results fails its whole batch.
    """
    from tqdm import tqdm

    out: list[Verdict] = []
    with tqdm(total=len(requests), desc="judging", unit="label", disable=None if progress is None else not progress) as bar:
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            reason = "the judge returned no result for this request"
            try:
                results = list(judge.judge(batch))
                if len(results) != len(batch):
                    raise RuntimeError(f"{type(judge).__name__} returned {len(results)} results for {len(batch)} requests")
            except Exception as err:  # noqa: BLE001 - a custom judge's crash is reported as failures, never lost
                results = [None] * len(batch)
                reason = f"{type(err).__name__}: {err}"
            for result in results:
                if result is None:
                    out.append((None, reason))
                elif getattr(result, "score", None) is None or not math.isfinite(float(result.score)):
                    out.append((None, getattr(result, "error", None) or "no verdict"))
                else:
                    out.append((float(result.score) >= 0.5, None))
            bar.update(len(batch))
    return out


# ---- the report ---------------------------------------------------------------------------------------

FAILURE_WARNING = 0.1  # a warning is printed when more than this share of the lines has no verdict


def summarise(labels: list[Label], verdicts: list[Verdict]) -> dict[str, Any]:
    """The figures and per-line verdicts: failures out of agreement and kappa, counted on their own."""
    judged = [(label, verdict) for label, (verdict, _) in zip(labels, verdicts) if verdict is not None]
    table = confusion_table([v for _, v in judged], [label.label for label, _ in judged])
    n = table.n
    low, high = wilson_interval(table.agreements, n)
    kappa = cohen_kappa(table)
    lines = [{"id": label.id, "line": label.line, "label": label.label, "verdict": verdict,
              "agree": None if verdict is None else verdict == label.label, "error": error}
             for label, (verdict, error) in zip(labels, verdicts)]
    return {
        "n_labels": len(labels),
        "n_judged": n,
        "n_failures": len(labels) - n,
        "agreement": table.agreements / n if n else None,
        "agreement_ci95": None if not n else [low, high],
        "kappa": None if math.isnan(kappa) else kappa,
        "confusion": table._asdict(),
        "judge_yes_rate": table.judge_yes / n if n else None,
        "human_yes_rate": table.human_yes / n if n else None,
        "failures": [{"id": row["id"], "line": row["line"], "error": row["error"]} for row in lines if row["verdict"] is None],
        "lines": lines,
    }


def report_text(results: dict[str, Any]) -> str:
    """The printed table."""
    c = Confusion(**results["confusion"])
    n = results["n_judged"]
    out = [f"judge: {results['judge']}", f"labels: {results['labels']} ({results['n_labels']} lines"
           + (f", {len(results['skipped_lines'])} malformed lines skipped)" if results["skipped_lines"] else ")")]
    out.append(f"judged: {n}   failures: {results['n_failures']} (left out of agreement and kappa)")
    if results["n_failures"] > FAILURE_WARNING * results["n_labels"]:
        out.append(f"warning: {results['n_failures']} of {results['n_labels']} lines have no verdict, so the figures "
                   f"rest on the other {n} only: check the failures below")
    if n:
        low, high = results["agreement_ci95"]
        out.append(f"agreement: {100 * results['agreement']:.1f} % ({c.agreements}/{n}), "
                   f"95 % CI {100 * low:.1f}-{100 * high:.1f} % (Wilson)")
    else:
        out.append("agreement: undefined (no line judged)")
    kappa = results["kappa"]
    out.append("Cohen's kappa: " + (f"{kappa:.3f}" if kappa is not None else "undefined (p_e = 1 or no line judged)"))
    out += ["", f"{'':>12}{'human yes':>11}{'human no':>10}{'total':>7}",
            f"{'judge yes':>12}{c.judge_yes_human_yes:>11}{c.judge_yes_human_no:>10}{c.judge_yes:>7}",
            f"{'judge no':>12}{c.judge_no_human_yes:>11}{c.judge_no_human_no:>10}{n - c.judge_yes:>7}",
            f"{'total':>12}{c.human_yes:>11}{n - c.human_yes:>10}{n:>7}"]
    if results["failures"]:
        out += ["", f"failures ({len(results['failures'])}):"]
        out += [f"  {f['id']} (line {f['line']}): {f['error']}" for f in results["failures"]]
    if results["skipped_lines"]:
        out += ["", f"malformed lines skipped ({len(results['skipped_lines'])}):"]
        out += [f"  {s}" for s in results["skipped_lines"]]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="See the module docstring of tools/judge_agreement.py for the labels format.")
    parser.add_argument("labels", type=Path, help="JSON Lines: question, options, answer, observation, label (+ id, facts)")
    parser.add_argument("--judge", required=True,
                        help="'rule', a YAML/JSON file or inline JSON {class_path, init_args}, or a config with a PerceptionJudgeReward")
    parser.add_argument("--out", type=Path, default=None, help="write the figures and every line's verdict here (JSON)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="requests per judge call (the progress bar moves once per call; keep it >= the judge's concurrency)")
    parser.add_argument("--skip-bad", action="store_true", help="leave malformed lines out (and list them) instead of stopping")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: only when stderr is a terminal)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        labels, skipped = read_labels(args.labels, args.skip_bad)
    except LabelError as err:
        raise SystemExit(f"error: {err}") from None
    if not labels:
        raise SystemExit(f"error: {args.labels}: no labelled lines")
    try:
        judge = load_judge(args.judge)
    except ValueError as err:
        raise SystemExit(f"error: --judge: {err}") from None
    verdicts = run_judge(judge, requests_of(labels), args.batch_size, args.progress)
    results = {"labels": str(args.labels), "judge": describe(judge), **summarise(labels, verdicts)}
    results = {**{k: v for k, v in results.items() if k != "lines"}, "skipped_lines": skipped, "lines": results["lines"]}
    print(report_text(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")
    return 0 if results["n_judged"] else 1  # no verdict at all: the judge is not working


if __name__ == "__main__":
    sys.exit(main())
