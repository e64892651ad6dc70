"""Evaluate one compression policy on a list of items: accuracy and the measured kept KV share.

:class:`Evaluator` is the interface the study uses; :class:`ServerEvaluator` asks a running
SGLang server (``--attention-backend vlcache``) through its OpenAI chat endpoint, sending the
*whole* policy per request in ``custom_params["vlcache"]`` (so whatever policy file the server
loaded never leaks into a trial) and reading the measured ``vlcache_kept_ratio`` from the
response's ``meta_info``. :func:`hf_evaluator` adapts the Hugging Face harness
(``vlcache_sglang.research.hf_eval``) to the same interface.
"""
from __future__ import annotations

import concurrent.futures as cf
import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import requests

from vlcache_sglang.policy import PolicyConfig

from .data import EvalItem

FULL_CACHE = PolicyConfig(method="full", alpha=1.0)


@dataclass(frozen=True)
class Answer:
    """One generated answer with the KV share kept for its prompt."""

    text: str
    kept_ratio: float
    prompt_tokens: int


@dataclass(frozen=True)
class TrialResult:
    """Accuracy (0..1, exact match) and measured kept KV share (prompt-token weighted) over ``n`` items."""

    accuracy: float
    kept_ratio: float
    n: int
    per_group: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "kept_ratio": self.kept_ratio, "n": self.n,
                "per_group": dict(self.per_group), "seconds": self.seconds}


class Evaluator(Protocol):
    """What a study needs from a backend."""

    def evaluate(self, policy: PolicyConfig, items: Sequence[EvalItem]) -> TrialResult: ...


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding spaces or final full stop."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def is_correct(prediction: str, answers: Sequence[str]) -> bool:
    """Exact match of the whole answer after :func:`normalize`, against any accepted answer."""
    p = normalize(prediction)
    return any(p == normalize(a) for a in answers)


def policy_request(policy: PolicyConfig) -> dict[str, Any]:
    """The complete ``custom_params["vlcache"]`` for ``policy``: ``alpha`` travels as the
    request key ``budget``, every other field (``budget_fn`` among them) under its own name."""
    fields = policy.to_dict()
    return {"budget": fields.pop("alpha"), "method": fields.pop("method"), **fields}


def score(items: Sequence[EvalItem], answers: Sequence[Answer], seconds: float = 0.0) -> TrialResult:
    """Aggregate per-item answers into a :class:`TrialResult`."""
    if not items or len(items) != len(answers):
        raise ValueError(f"need one answer per item, got {len(answers)} answers for {len(items)} items")
    ok = [is_correct(a.text, it.answers) for it, a in zip(items, answers)]
    groups: dict[str, list[bool]] = {}
    for it, o in zip(items, ok):
        groups.setdefault(it.group, []).append(o)
    tokens = sum(a.prompt_tokens for a in answers)
    kept = (sum(a.kept_ratio * a.prompt_tokens for a in answers) / tokens if tokens
            else sum(a.kept_ratio for a in answers) / len(answers))
    return TrialResult(accuracy=sum(ok) / len(ok), kept_ratio=kept, n=len(ok),
                       per_group={g: sum(v) / len(v) for g, v in sorted(groups.items())}, seconds=seconds)


def _scalar(value: Any, default: float) -> float:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else float(value)


class ServerEvaluator:
    """Asks a running ``--attention-backend vlcache`` SGLang server at ``url``."""

    def __init__(self, url: str, *, max_tokens: int = 16, concurrency: int = 8, timeout: float = 600.0,
                 sharing: str | None = "prefix") -> None:
        self.url = url.rstrip("/")
        #: radix sharing asked per request: "prefix" reuses only the uncompressed image prefix, so a
        #: repeated request is planned afresh (as with a cold cache) and every trial measures its own
        #: policy; None leaves the server's setting
        self.sharing = sharing
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.timeout = timeout
        self.session = requests.Session()

    def model_path(self) -> str:
        """The ``--model-path`` the server runs."""
        r = self.session.get(f"{self.url}/get_model_info", timeout=60)
        r.raise_for_status()
        return str(r.json().get("model_path"))

    def cells(self) -> str:
        """The KV cells the server holds (``--vlcache-cells``): what its kept ratios count."""
        from vlcache_sglang.tooling.serving import vlcache_state

        return str(vlcache_state(self.url).get("cells", "layer"))

    def ask(self, policy: PolicyConfig, item: EvalItem) -> Answer:
        body = {
            "model": "default", "temperature": 0, "max_tokens": self.max_tokens, "return_meta_info": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": item.image_data_url}},
                {"type": "text", "text": item.question}]}],
            "custom_params": {"vlcache": policy_request(policy)},
        }
        if self.sharing is not None:
            body["custom_params"]["vlcache"]["sharing"] = self.sharing
        r = self.session.post(f"{self.url}/v1/chat/completions", json=body, timeout=self.timeout)
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code} for item {item.id}: {r.text[:500]}")
        choice = r.json()["choices"][0]
        meta = choice.get("meta_info") or {}
        return Answer(text=choice["message"]["content"] or "",
                      kept_ratio=_scalar(meta.get("vlcache_kept_ratio"), 1.0),
                      prompt_tokens=int(_scalar(meta.get("prompt_tokens"), 0)))

    def evaluate(self, policy: PolicyConfig, items: Sequence[EvalItem]) -> TrialResult:
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(lambda it: self.ask(policy, it), items))
        return score(items, answers, time.monotonic() - t0)


class HFEvaluator:
    """Adapter over ``vlcache_sglang.research.hf_eval`` (Hugging Face transformers, the policy's plan applied).

    Assumed API: ``hf_eval.load(model_path, *, device) -> handle`` and
    ``hf_eval.answer(handle, policy: PolicyConfig, image: PIL.Image, question: str, *,
    max_new_tokens: int, cells: str) -> (text: str, kept_ratio: float, prompt_tokens: int)``; ``cells``
    as the server's ``--vlcache-cells``, and the kept ratio is what that server would hold.
    """

    def __init__(self, model_path: str, *, max_tokens: int = 16, device: str = "cpu", cells: str = "layer") -> None:
        try:
            import vlcache_sglang.research.hf_eval as hf_eval
        except ImportError as exc:
            raise RuntimeError(f"--backend hf needs vlcache_sglang.research.hf_eval, which is not available ({exc}); "
                               "use --backend server") from exc
        missing = [n for n in ("load", "answer") if not callable(getattr(hf_eval, n, None))]
        if missing:
            raise RuntimeError(f"vlcache_sglang.research.hf_eval lacks {missing}; --backend hf expects "
                               "load(model_path, device=...) and answer(handle, policy, image, question, "
                               "max_new_tokens=...)")
        self._hf = hf_eval
        self.handle = hf_eval.load(model_path, device=device)
        self.max_tokens = max_tokens
        self.cells = cells

    def evaluate(self, policy: PolicyConfig, items: Sequence[EvalItem]) -> TrialResult:
        t0 = time.monotonic()
        answers = []
        for it in items:
            text, kept, tokens = self._hf.answer(self.handle, policy, it.image(), it.question,
                                                 max_new_tokens=self.max_tokens, cells=self.cells)
            answers.append(Answer(str(text), float(kept), int(tokens)))
        return score(items, answers, time.monotonic() - t0)
