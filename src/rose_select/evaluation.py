"""Evaluation of a (LoRA-tuned) model on the target task.

Held-out preference triples (x, y_w, y_l), per subtask and overall, with log π the *summed*
response log-probability and π_ref the base model (the same network with the adapter disabled):

  ``rewards/chosen``, ``rewards/rejected``  mean implicit DPO reward r(y) = β (log π(y|x) − log π_ref(y|x))
  ``rewards/accuracies``                    fraction of triples with r(y_w) > r(y_l) (ties count as wrong)
  ``rewards/margins``                       mean r(y_w) − r(y_l)
  ``logps/accuracy``                        fraction with log π(y_w|x) > log π(y_l|x)
  ``logps/accuracy_normalized``             the same with per-token (length-normalised) log-probs
  ``logps/chosen``, ``logps/rejected``      mean summed log-probs
  ``loss/pairwise``                         mean DPO loss −log σ(r(y_w) − r(y_l)) (ROSE's validation loss)
  ``loss/sft``                              mean response-token cross-entropy of the chosen answers

Without an adapter π = π_ref: every reward and margin is exactly 0 and ``loss/pairwise`` is log 2.

Test prompts with golden answers (``test/<set>/<set>_<subtask>.json``):
  ``golden/logp``, ``golden/logp_per_token``  summed / per-token log-likelihood of the golden answer
  ``judge/win_rate``                         win rate of the greedy answer against the golden answer,
                                             over the pairs the judge gave a verdict on (``judge/judged``)
  ``judge/invalid``, ``judge/invalid_share`` pairs an endpoint judge gave no verdict on in the fixed
                                             form (after its re-asks): left out of the win rate, never
                                             guessed; past ``judge_max_invalid_share`` the run stops

Judges: ``rose_select.judges`` (local reward model or LM) and ``rose_select.judge_http`` (endpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rose_select import data, verdicts
from rose_select.checkpoint import check_base_model
from rose_select.config import require, to_dict
from rose_select.data import load_test_prompts
from rose_select.errors import ConfigError, DataError, JudgeError
from rose_select.io import atomic_path, write_json, write_jsonl, write_text
from rose_select.judge_http import HttpJudge, chat_completions_url, one_line
from rose_select.judges import hh_text, load_judge
from rose_select.losses import DpoSettings, response_logprobs, sft_loss_from_packed, sum_per_row
from rose_select.modeling import ModelSettings, load_adapter, load_model, load_tokenizer, model_identity
from rose_select.records import Message, PreferenceTriple
from rose_select.runtime import progress_disabled, resolve_device
from rose_select.tables import markdown
from rose_select.tokenization import (
    IGNORE_INDEX,
    TokenizeConfig,
    collate,
    encode_messages,
    encode_prompt,
    encode_triple,
)
from rose_select.verdicts import NoVerdict


@dataclass
class EvalSettings:
    """How a model is measured, whatever the files: the ``evaluate`` section of a run."""

    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    judge: str | None = field(default=None, metadata={"help": "judge (win rate vs golden): a reward model or causal LM, or with judge_url the endpoint's model name"})
    judge_kind: str = field(default="auto", metadata={"help": "auto | reward | pairwise | http (http: with judge_url)"})
    judge_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible chat endpoint, e.g. http://127.0.0.1:8080/v1; judge is then the endpoint's model name"})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the endpoint's API key (sent as a Bearer token when set)"})
    judge_cache: str | None = field(default=None, metadata={"help": "endpoint verdict cache, JSON lines; a rerun reuses it (absent: OUTPUT/judge_cache.jsonl)"})
    judge_retries: int = field(default=4, metadata={"help": "retries of an endpoint request on 429, 5xx, timeouts and refused connections"})
    judge_backoff: float = field(default=1.0, metadata={"help": "seconds before the first retry, doubled each retry (a Retry-After header wins)"})
    judge_rps: float | None = field(default=None, metadata={"help": "at most this many endpoint requests per second"})
    judge_timeout: float = field(default=60.0, metadata={"help": "seconds to wait for one endpoint reply"})
    judge_protocol: str = field(default="json", metadata={"help": "form of an endpoint verdict: json (the reply is {\"verdict\": \"A\"|\"B\"|\"C\"}) | brackets (MT-Bench: [[A]], [[B]] or [[C]] after any explanation)"})
    judge_response_format: str = field(default="auto", metadata={"help": "response_format sent with the json protocol, so the server's grammar can only answer a verdict: auto (json_schema, then json_object, then none, as the server rejects each) | json_schema | json_object | none"})
    judge_reasks: int = field(default=2, metadata={"help": "times an endpoint reply that is no verdict is asked again (with a reminder of the form) before the pair counts as invalid"})
    judge_max_tokens: int | None = field(default=None, metadata={"help": "longest endpoint reply in tokens (absent: 32 for json, 512 for brackets)"})
    judge_max_invalid_share: float = field(default=0.1, metadata={"help": "stop with an error once more than this share of the test prompts have no valid verdict (invalid pairs are left out of the win rate and counted)"})
    max_new_tokens: int = field(default=128, metadata={"help": "greedy answer length for the judge"})

    def __post_init__(self):
        checks = [
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.judge_kind in ("auto", "reward", "pairwise", "http"), f"judge_kind must be auto|reward|pairwise|http, got {self.judge_kind!r}"),
            (self.judge_kind in ("auto", "http") or not self.judge_url, f"judge_url is an endpoint judge: judge_kind must be auto or http, got {self.judge_kind!r}"),
            (self.judge_kind != "http" or self.judge_url, "judge_kind http needs judge_url (the endpoint)"),
            (not self.judge_url or self.judge, "judge_url needs judge: the model name the endpoint serves"),
            (self.judge_retries >= 0, f"judge_retries must be >= 0, got {self.judge_retries}"),
            (self.judge_backoff >= 0, f"judge_backoff must be >= 0, got {self.judge_backoff}"),
            (self.judge_rps is None or self.judge_rps > 0, f"judge_rps must be > 0, got {self.judge_rps}"),
            (self.judge_timeout > 0, f"judge_timeout must be > 0, got {self.judge_timeout}"),
            (self.judge_protocol in verdicts.PROTOCOLS, f"judge_protocol must be json|brackets, got {self.judge_protocol!r}"),
            (self.judge_response_format in verdicts.RESPONSE_FORMAT_CHOICES,
             f"judge_response_format must be auto|json_schema|json_object|none, got {self.judge_response_format!r}"),
            (self.judge_reasks >= 0, f"judge_reasks must be >= 0, got {self.judge_reasks}"),
            (self.judge_max_tokens is None or self.judge_max_tokens >= 1, f"judge_max_tokens must be >= 1, got {self.judge_max_tokens}"),
            (0 <= self.judge_max_invalid_share <= 1, f"judge_max_invalid_share must be in [0, 1], got {self.judge_max_invalid_share}"),
        ]
        require(checks)
        if self.judge_url:
            chat_completions_url(self.judge_url)  # validates the URL
        getattr(super(), "__post_init__", lambda: None)()


@dataclass
class EvalConfig(ModelSettings, EvalSettings, DpoSettings, data.SubtaskSettings):
    """One evaluation: the base model (also π_ref), an optional adapter, held-out pairs and/or test prompts."""

    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter dir (absent: evaluate the base model)"})
    preferences: list[str] = field(default_factory=list, metadata={"help": "held-out preference file(s), comma-separated"})
    preference_format: str = field(default="auto", metadata={"help": "format of the preference files (auto: detect)"})
    test_prompts: str | None = field(default=None, metadata={"help": "dir (or file) of test prompts with golden answers"})
    limit: int | None = field(default=None, metadata={"help": "at most this many triples / test prompts per subtask"})
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    reference_cache: str | None = field(default=None, metadata={"help": "an .npz that keeps the base model's log-probs of the pairs for reuse across adapters"})
    output: str = field(default="runs/eval", metadata={"help": "output directory"})

    RENAMED = {"dtype": "model_dtype", "max_length": "tokenize.max_length", "template": "tokenize.template"}

    def __post_init__(self):
        super().__post_init__()
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")

    def make_judge(self, device):
        """The judge of the win rate: the endpoint's model with ``judge_url``, else a local model."""
        if not self.judge_url:
            return load_judge(self.judge, self.judge_kind, device)
        return HttpJudge(self.judge_url, self.judge, api_key_env=self.judge_api_key_env,
                         cache=self.judge_cache or str(Path(self.output) / "judge_cache.jsonl"),
                         retries=self.judge_retries, backoff=self.judge_backoff, rps=self.judge_rps,
                         timeout=self.judge_timeout, protocol=self.judge_protocol,
                         response_format=self.judge_response_format, reasks=self.judge_reasks,
                         max_tokens=self.judge_max_tokens)

# ---------------------------------------------------------------------------- pure metric math


def implicit_reward(logp, ref_logp, beta: float):
    """DPO implicit reward β (log π − log π_ref) (numpy or torch, elementwise)."""
    return beta * (logp - ref_logp)


def dpo_losses(pol_w, pol_l, ref_w, ref_l, beta: float) -> np.ndarray:
    """−log σ(β((π_w − ref_w) − (π_l − ref_l))), numerically stable, float64."""
    z = beta * ((np.asarray(pol_w, np.float64) - ref_w) - (np.asarray(pol_l, np.float64) - ref_l))
    return np.logaddexp(0.0, -z)


def preference_metrics(pol_w, pol_l, ref_w, ref_l, n_w, n_l, sft_w, beta: float) -> dict:
    """Means over triples of the metrics in the module docstring. Inputs: arrays of length N."""
    pol_w, pol_l, ref_w, ref_l, n_w, n_l, sft_w = (np.asarray(a, np.float64) for a in (pol_w, pol_l, ref_w, ref_l, n_w, n_l, sft_w))
    r_w, r_l = implicit_reward(pol_w, ref_w, beta), implicit_reward(pol_l, ref_l, beta)
    return {
        "n": int(len(pol_w)),
        "rewards/chosen": float(r_w.mean()),
        "rewards/rejected": float(r_l.mean()),
        "rewards/accuracies": float((r_w > r_l).mean()),
        "rewards/margins": float((r_w - r_l).mean()),
        "logps/chosen": float(pol_w.mean()),
        "logps/rejected": float(pol_l.mean()),
        "logps/accuracy": float((pol_w > pol_l).mean()),
        "logps/accuracy_normalized": float((pol_w / np.maximum(n_w, 1) > pol_l / np.maximum(n_l, 1)).mean()),
        "loss/pairwise": float(dpo_losses(pol_w, pol_l, ref_w, ref_l, beta).mean()),
        "loss/sft": float(sft_w.mean()),
    }

# ---------------------------------------------------------------------------- model passes


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def sequence_stats(model, encodings: Sequence[dict], pad_id: int, batch_size: int, device) -> dict[str, np.ndarray]:
    """Summed response log-prob, response token count and SFT loss of each encoding."""
    import torch

    encodings = list(encodings)
    # batches of similar length waste little compute on padding; results go back to input order
    order = sorted(range(len(encodings)), key=lambda i: (len(encodings[i]["input_ids"]), i))
    out = {"logp": [], "n": [], "sft": []}
    with torch.no_grad():
        for chunk in _batches(order, batch_size):
            b = {k: v.to(device) for k, v in collate([encodings[i] for i in chunk], pad_id).items()}
            logp, rows = response_logprobs(model, b)
            out["logp"].append(sum_per_row(logp, rows, len(chunk)).double().cpu().numpy())
            out["sft"].append(sft_loss_from_packed(logp, rows, len(chunk)).double().cpu().numpy())
            out["n"].append((b["labels"][:, 1:] != IGNORE_INDEX).sum(-1).cpu().numpy())
    inverse = np.argsort(np.asarray(order, dtype=np.int64))
    return {k: np.concatenate(v)[inverse] if order else np.zeros(0) for k, v in out.items()}


def _has_adapter(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def sequences_key(tag: str, seqs: Sequence[dict]) -> str:
    """Fingerprint of a reference pass: ``tag`` (base model and dtype) and the exact token ids and labels."""
    import hashlib

    h = hashlib.sha256(f"{tag}\0".encode())
    for e in seqs:
        h.update(np.asarray(e["input_ids"], np.int64).tobytes() + b"|")
        h.update(np.asarray(e["labels"], np.int64).tobytes() + b";")
    return h.hexdigest()


def _cached_reference(path: str | None, key: str, compute) -> dict[str, np.ndarray]:
    """Reference (base-model) log-probs are the same for every adapter evaluated on the same
    pairs: keep them in ``path`` (an .npz tagged with ``key``) and reuse them when the key matches."""

    if path and Path(path).exists():
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return {k: z[k] for k in ("logp", "n", "sft")}
    ref = compute()
    if path:
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), **ref)
    return ref


def triple_stats(model, tokenizer, triples: Sequence[PreferenceTriple], tok_cfg: TokenizeConfig,
                 batch_size: int, device, *, reference_cache: str | None = None,
                 reference_key: str = "") -> dict[str, np.ndarray]:
    """Policy and reference (adapter disabled) stats of the chosen and rejected answers.
    ``reference_cache``: an .npz reused across adapters (see ``_cached_reference``)."""

    enc = [encode_triple(t, tokenizer, tok_cfg) for t in triples]
    seqs = [e["chosen"] for e in enc] + [e["rejected"] for e in enc]
    pad, n = tokenizer.pad_token_id, len(enc)
    key = sequences_key(reference_key, seqs)
    if _has_adapter(model):
        pol = sequence_stats(model, seqs, pad, batch_size, device)

        def reference():
            with model.disable_adapter():
                return sequence_stats(model, seqs, pad, batch_size, device)

        ref = _cached_reference(reference_cache, key, reference)
    else:  # π = π_ref: rewards exactly 0
        pol = ref = _cached_reference(reference_cache, key,
                                      lambda: sequence_stats(model, seqs, pad, batch_size, device))
    return {"pol_w": pol["logp"][:n], "pol_l": pol["logp"][n:], "ref_w": ref["logp"][:n], "ref_l": ref["logp"][n:],
            "n_w": pol["n"][:n], "n_l": pol["n"][n:], "sft_w": pol["sft"][:n]}


def evaluate_preferences(model, tokenizer, triples: Sequence[PreferenceTriple], cfg: EvalConfig, device="cpu") -> dict:
    """``{"overall": metrics, "per_subtask": {subtask: metrics}}`` on held-out triples."""
    if not triples:
        raise DataError("no preference triples to evaluate")
    s = triple_stats(model, tokenizer, triples, cfg.tokenize, cfg.batch_size, device,
                     reference_cache=cfg.reference_cache, reference_key=f"{model_identity(cfg.model)}\0{cfg.model_dtype}")
    keys = ("pol_w", "pol_l", "ref_w", "ref_l", "n_w", "n_l", "sft_w")
    subtasks = np.array([t.subtask for t in triples])
    per = {name: preference_metrics(*(s[k][subtasks == name] for k in keys), beta=cfg.beta)
           for name in dict.fromkeys(subtasks.tolist())}
    return {"overall": preference_metrics(*(s[k] for k in keys), beta=cfg.beta), "per_subtask": per}


def greedy_answers(model, tokenizer, prompts: Sequence[list[Message]], tok_cfg: TokenizeConfig,
                   max_new_tokens: int, batch_size: int, device) -> list[str]:
    """Greedy decoding of each prompt (left-padded batches)."""
    import torch

    answers = []
    for chunk in _batches(list(prompts), batch_size):
        enc = [{"input_ids": encode_prompt(p, tokenizer, tok_cfg)} for p in chunk]
        b = collate(enc, tokenizer.pad_token_id, padding_side="left")
        with torch.no_grad():
            out = model.generate(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        width = b["input_ids"].shape[1]
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


def golden_stats(model, tokenizer, items: Sequence[tuple[list[Message], str]], tok_cfg: TokenizeConfig,
                 batch_size: int, device) -> dict[str, np.ndarray]:

    enc = [encode_messages(list(p) + [Message("assistant", g)], tokenizer, tok_cfg, record=str(i), pair=True)
           for i, (p, g) in enumerate(items)]
    return sequence_stats(model, enc, tokenizer.pad_token_id, batch_size, device)


def test_prompts_by_subtask(path, limit: int | None = None) -> dict[str, list[tuple[list[Message], str]]]:
    """Test prompts with golden answers (``rose_select.data.load_test_prompts``), grouped by
    subtask in file order: ``{subtask: [(prompt messages, golden answer)]}``, at most ``limit`` each."""
    if not Path(path).exists():
        raise ConfigError(f"test prompts not found: {path}")
    grouped: dict[str, list] = {}
    for item in load_test_prompts(path):
        group = grouped.setdefault(item["subtask"], [])
        if limit is None or len(group) < limit:
            group.append((item["prompt_messages"], item["golden_answer"].strip()))
    if not grouped:
        raise ConfigError(f"{path}: no test prompts (*.json files of {{prompt, golden_answer}})")
    return grouped


def win_rate_metrics(wins: Sequence[float | NoVerdict]) -> dict:
    """Win rate over the pairs the judge gave a verdict on; the others are counted, never guessed
    (``judge/win_rate`` is None when no pair has a verdict)."""
    valid = [w for w in wins if not isinstance(w, NoVerdict)]
    invalid = len(wins) - len(valid)
    return {"judge/win_rate": float(np.mean(valid)) if valid else None, "judge/judged": len(valid),
            "judge/invalid": invalid, "judge/invalid_share": invalid / len(wins) if wins else 0.0}


def overall_win_rate(per: Sequence[dict]) -> dict:
    """``win_rate_metrics`` over all subtasks from theirs (the win rate weighted by judged pairs)."""
    judged, invalid = sum(m["judge/judged"] for m in per), sum(m["judge/invalid"] for m in per)
    wins = sum(m["judge/win_rate"] * m["judge/judged"] for m in per if m["judge/judged"])
    return {"judge/win_rate": wins / judged if judged else None, "judge/judged": judged,
            "judge/invalid": invalid, "judge/invalid_share": invalid / (judged + invalid) if judged + invalid else 0.0}


class InvalidBudget:
    """Counts the pairs with no verdict and stops the run once they are more than ``max_share`` of
    all ``total`` pairs: the final share could then only be larger, so no request is wasted."""

    def __init__(self, total: int, max_share: float, where: str):
        self.total, self.max_share, self.where, self.invalid = total, max_share, where, 0

    def check(self, outcome: float | NoVerdict) -> float | NoVerdict:
        if isinstance(outcome, NoVerdict):
            self.invalid += 1
            if self.invalid > self.max_share * self.total:
                raise JudgeError(
                    f"{self.where}: {self.invalid} of {self.total} test prompts have no valid verdict "
                    f"({self.invalid / self.total:.0%} or more), above judge_max_invalid_share "
                    f"{self.max_share:.0%}; e.g. the reply {one_line(outcome.reply)!r}. The valid verdicts "
                    f"are cached and a rerun asks only the rest: use a stronger judge (or a larger "
                    f"--judge-max-tokens if its replies are cut off), or raise --judge-max-invalid-share")
        return outcome


def _generation(subtask: str, prompt, answer: str, golden: str, outcome) -> dict:
    row = {"subtask": subtask, "prompt": hh_text(prompt), "answer": answer, "golden": golden}
    if isinstance(outcome, NoVerdict):
        return {**row, "win": None, "no_verdict_reply": outcome.reply}
    return {**row, "win": outcome}


def evaluate_test_prompts(model, tokenizer, prompts: dict[str, list], cfg: EvalConfig, judge=None, device="cpu"):
    """Golden-answer log-likelihood (and judge win rate) per subtask; also returns the generations."""
    from tqdm.auto import tqdm

    tok_cfg, per, generations = cfg.tokenize, {}, []
    where = judge.where() if hasattr(judge, "where") else f"judge {cfg.judge!r}"
    budget = InvalidBudget(sum(map(len, prompts.values())), cfg.judge_max_invalid_share, where)
    for subtask, items in tqdm(prompts.items(), desc="test prompts", disable=progress_disabled()):
        g = golden_stats(model, tokenizer, items, tok_cfg, cfg.batch_size, device)
        m = {"n_prompts": len(items), "golden/logp": float(g["logp"].mean()),
             "golden/logp_per_token": float((g["logp"] / np.maximum(g["n"], 1)).mean())}
        if judge is not None:
            answers = greedy_answers(model, tokenizer, [p for p, _ in items], tok_cfg, cfg.max_new_tokens,
                                     cfg.batch_size, device)
            wins = [budget.check(judge.judge(p, a, gold)) for (p, gold), a in zip(items, answers)]
            m.update(win_rate_metrics(wins))
            generations += [_generation(subtask, p, a, gold, w) for (p, gold), a, w in zip(items, answers, wins)]
        per[subtask] = m
    return per, generations


def _overall_test(per: dict) -> dict:
    """Prompt-weighted means of the per-subtask golden-answer metrics; the judge's over judged pairs."""
    n = sum(m["n_prompts"] for m in per.values())
    out = {"n_prompts": n}
    for key in ("golden/logp", "golden/logp_per_token"):
        vals = [(m[key], m["n_prompts"]) for m in per.values() if key in m]
        if vals:
            out[key] = sum(v * k for v, k in vals) / sum(k for _, k in vals)
    judged = [m for m in per.values() if "judge/judged" in m]
    return {**out, **overall_win_rate(judged)} if judged else out

# ---------------------------------------------------------------------------- stage


def markdown_table(metrics: dict) -> str:
    """One row per subtask (and overall), one column per metric."""
    rows = {**metrics.get("per_subtask", {}), "**overall**": metrics.get("overall", {})}
    return markdown([{"subtask": name, **m} for name, m in rows.items()]) + "\n"


def _load_triples(cfg: EvalConfig) -> list[PreferenceTriple]:

    triples = []
    for path in cfg.preferences:
        if not Path(path).exists():
            raise ConfigError(f"preference file not found: {path}")
        triples += data.load_preferences(path, format=cfg.preference_format, **cfg.subtask_kwargs())
    if cfg.limit:
        counts: dict[str, int] = {}
        kept = []
        for t in triples:
            counts[t.subtask] = counts.get(t.subtask, 0) + 1
            if counts[t.subtask] <= cfg.limit:
                kept.append(t)
        triples = kept
    return triples


def run_evaluate(cfg: EvalConfig, triples: Sequence[PreferenceTriple] | None = None) -> Path:
    """Evaluate ``cfg.model`` (+ ``cfg.adapter``); writes ``metrics.json``, ``metrics.md`` and,
    with a judge, ``generations.jsonl``. ``triples``: evaluate these instead of reading files."""

    triples = list(triples) if triples is not None else _load_triples(cfg)
    if not triples and not cfg.test_prompts:
        raise ConfigError("nothing to evaluate: give preferences and/or test_prompts")
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype=cfg.model_dtype, device=device)
    if cfg.adapter:  # trained on this base model, which is then also the reference (adapter off)
        check_base_model(cfg.adapter, cfg.model, user="rose evaluate")
        model = load_adapter(model, cfg.adapter, trainable=False).eval()
    metrics = {"config": to_dict(cfg), "overall": {}, "per_subtask": {}}
    if triples:
        pref = evaluate_preferences(model, tokenizer, triples, cfg, device)
        metrics["overall"], metrics["per_subtask"] = dict(pref["overall"]), {k: dict(v) for k, v in pref["per_subtask"].items()}
    generations = []
    if cfg.test_prompts:
        judge = cfg.make_judge(device) if cfg.judge else None
        per_test, generations = evaluate_test_prompts(model, tokenizer, test_prompts_by_subtask(cfg.test_prompts, cfg.limit),
                                                      cfg, judge, device)
        if hasattr(judge, "stats"):  # endpoint judge: requests sent, retries, verdicts served from the cache
            metrics["judge_usage"] = {**judge.stats, "protocol": judge.protocol, "response_format": judge.response_format}
        for name, m in per_test.items():
            metrics["per_subtask"].setdefault(name, {}).update(m)
        metrics["overall"].update(_overall_test(per_test))
    out = Path(cfg.output)
    write_json(out / "metrics.json", metrics)
    write_text(out / "metrics.md", markdown_table(metrics))
    if generations:
        write_jsonl(out / "generations.jsonl", generations)
    return out
