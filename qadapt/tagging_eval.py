"""`qadapt eval` of a token-classification run: entity precision, recall and F1 per type and overall.

Entities are scored with seqeval in strict IOB2 mode (an entity counts only if its type and its exact
span match; an I- tag that starts nothing starts no entity), as CoNLL's conlleval and the papers do.
Results go where the math evaluation's go: metrics.json and predictions.jsonl (one line per sentence).
"""

from __future__ import annotations

from pathlib import Path

from qadapt.conll import load_sentences
from qadapt.errors import QadaptError
from qadapt.run_files import eval_dir
from qadapt.scores import set_name, write_results
from qadapt.token_classification import predict_tags

AVERAGES = ("micro avg", "macro avg", "weighted avg")


def entity_scores(golds: list[list[str]], predicted: list[list[str]]) -> dict:
    """Overall (micro-averaged) and per-type precision, recall, F1 and gold entity count."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    report = classification_report(golds, predicted, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)

    def row(scores: dict) -> dict:
        return {"precision": float(scores["precision"]), "recall": float(scores["recall"]),
                "f1": float(scores["f1-score"]), "entities": int(scores["support"])}

    return {**row(report["micro avg"]), "types": {kind: row(s) for kind, s in report.items() if kind not in AVERAGES}}


def evaluate_tagging_set(model, tokenizer, spec: str, limit: int | None, batch_size: int, cutoff_len: int,
                         on_done=None) -> tuple[dict, list[dict]]:
    """(scores row, prediction rows) of one CoNLL set (a hub id: its test split)."""
    sentences = load_sentences(spec, "test")[:limit]
    predicted = predict_tags(model, tokenizer, sentences, batch_size, cutoff_len, on_done)
    name = set_name(spec)
    rows = [{"set": name, "tokens": s.tokens, "gold": s.tags, "predicted": p, "correct": s.tags == p}
            for s, p in zip(sentences, predicted)]
    return {**entity_scores([s.tags for s in sentences], predicted), "sentences": len(sentences)}, rows


def format_tagging_table(sets: dict[str, dict]) -> str:
    lines = ["| set | type | precision | recall | F1 | gold entities |", "|---|---|---|---|---|---|"]
    for name, row in sets.items():
        for kind, scores in [("all", row), *sorted(row["types"].items())]:
            lines.append(f"| {name} | {kind} | {100 * scores['precision']:.1f} | {100 * scores['recall']:.1f} | "
                         f"{100 * scores['f1']:.1f} | {scores['entities']} |")
    return "\n".join(lines)


def run_tagging_eval(target: str, data: list[str], limit: int | None = None, batch_size: int = 64,
                     out: Path | None = None, compute_dtype: str | None = None, loaded=None) -> dict:
    """Entity scores of a token-classification run on every CoNLL set in `data`; print, write, return them.

    `loaded` is (model, tokenizer, cutoff_len, output folder) of a model already in memory.
    """
    from tqdm import tqdm

    from qadapt.run_dir import load_trained_model

    if not data:
        raise QadaptError("name at least one evaluation set with --data (a CoNLL file, or a hub id with tokens "
                          "and ner_tags)")
    for spec in data:  # read every set before loading the model
        load_sentences(spec, "test")
    if loaded is None:
        model, tokenizer, recipe = load_trained_model(target, compute_dtype=compute_dtype)
        loaded = (model, tokenizer, recipe.data.cutoff_len, eval_dir(Path(target)))
    model, tokenizer, cutoff_len, default_out = loaded
    out_dir = Path(out) if out else default_out
    results, predictions = {}, []
    with tqdm(desc="eval", unit="sentence") as bar:
        for spec in data:
            row, rows = evaluate_tagging_set(model, tokenizer, spec, limit, batch_size, cutoff_len, bar.update)
            results[set_name(spec)] = row
            predictions += rows
    metrics = {"target": target, "task": "token-classification", "scheme": "IOB2 strict", "sets": results}
    write_results(out_dir, metrics, predictions)
    print(format_tagging_table(results))
    print(f"metrics and predictions: {out_dir}")
    return metrics
