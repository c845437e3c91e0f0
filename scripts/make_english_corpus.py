"""Write the built-in general-English corpus, `lft_core/data/english.jsonl.gz`, by sampling the embedded teacher.

Everyday English that works offline and needs no hub: SmolLM2-135M-Instruct (the embedded model) answers a
fixed list of varied requests (stories, explanations, conversations, letters, descriptions, opinions, how-tos;
`PROMPTS` below), several times each with fixed seeds. The file holds one JSON object a line: the request, the
seed and the text. It is regenerated with

    .venv/bin/python scripts/make_english_corpus.py [--model FOLDER] [--device cuda] [--out PATH]

Sampling is seeded, but a different device or library version draws different samples of the same
distribution; the shipped file is the reference (its hash is the corpus's content hash).
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STORY = ["a lighthouse keeper who finds a message in a bottle", "two friends who get lost on a mountain hike",
         "a baker who opens a shop in a small town", "a child's first day at a new school",
         "an old man who repairs clocks", "a dog that waits at a train station every evening",
         "a storm that cuts a village off for a week", "a nurse on a long night shift",
         "a teenager who learns to play the violin", "a family moving to another country",
         "a fisherman and an unusual catch", "a lost wallet returned by a stranger",
         "a gardener preparing for a flower show", "a girl who wants to become an astronaut",
         "a bus driver who knows every passenger", "a wedding where everything goes wrong",
         "a librarian who discovers a hidden room", "a farmer during a dry summer",
         "two neighbours who stop arguing", "a cat that moves into a bookshop"]
EXPLAIN = ["how rain forms", "why the sky is blue", "how to make bread at home", "how a bicycle stays upright",
           "how to plan a budget for a month", "why we need sleep", "how vaccines work", "how to start running",
           "how plants grow from seeds", "why leaves change colour in autumn", "how a bank loan works",
           "how to write a good email", "why exercise is good for the heart", "how the moon causes tides",
           "how to care for a houseplant", "how recycling works", "why some people are afraid of flying",
           "how to learn a new language", "how an election works", "how to cook rice"]
TALK = [("a customer", "a shop assistant", "returning a broken kettle"), ("two students", "", "an exam tomorrow"),
        ("a doctor", "a patient", "a persistent cough"), ("a mother", "her son", "cleaning his room"),
        ("two old friends", "", "meeting again after twenty years"), ("a tourist", "a local", "finding the museum"),
        ("a manager", "a new employee", "the first week at work"), ("two neighbours", "", "a noisy party"),
        ("a waiter", "a diner", "a mistake with the order"), ("a teacher", "a parent", "a child's progress"),
        ("a passenger", "a taxi driver", "the traffic and the weather"), ("two colleagues", "", "a holiday plan"),
        ("a grandmother", "her granddaughter", "how life was fifty years ago"),
        ("a coach", "a young player", "losing an important match"), ("two roommates", "", "sharing the chores")]
LETTER = ["a thank-you letter to a teacher", "a letter of complaint about a late delivery",
          "a letter to a friend about a new job", "an apology to a neighbour", "a postcard from a seaside holiday",
          "a note to a colleague who is leaving", "a letter to the town council about a park",
          "a birthday message to a grandfather", "a diary entry about a rainy Sunday",
          "a diary entry about a first job interview"]
DESCRIBE = ["a busy market on a Saturday morning", "a quiet village in winter", "your favourite meal",
            "a walk through a forest in spring", "a crowded train at rush hour", "the view from a hill at sunset",
            "an old kitchen full of memories", "a football match from the stands", "a city at night",
            "a small beach in the early morning"]
OPINION = ["whether children should have homework", "the best way to spend a free afternoon",
           "why people keep pets", "whether it is better to live in a city or the countryside",
           "what makes a good friend", "why people enjoy cooking for others", "whether money makes people happy",
           "the value of learning history", "why some people love rainy days", "the joys and troubles of travel"]


def prompts() -> list[str]:
    out = [f"Write a short story about {s}." for s in STORY]
    out += [f"Explain {s}, in plain words for a curious adult." for s in EXPLAIN]
    out += [f"Write a conversation between {a}{' and ' + b if b else ''} about {z}." for a, b, z in TALK]
    out += [f"Write {s}." for s in LETTER]
    out += [f"Describe {s}." for s in DESCRIBE]
    out += [f"Write a short essay on {s}." for s in OPINION]
    return out


PROMPTS = prompts()
SEEDS = range(16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "lft_core" / "data" / "english.jsonl.gz"))
    p.add_argument("--max-new-tokens", type=int, default=640)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="only the first N samples (a quick check)")
    a = p.parse_args()
    from lft_core.outputs import check_output_file, write_output
    from lft_core.errors import LFTError

    try:  # before the model loads: a regular file or a new name, outside the cache, never through a link
        check_output_file(a.out, "--out")
    except LFTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lft_core.model.loading import embedded_model_folder

    folder = a.model or str(embedded_model_folder())
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:  # the GGUF tokenizer has none; padding is masked anyway
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(a.device).eval()
    jobs = [(i, s) for s in SEEDS for i in range(len(PROMPTS))][: a.limit]
    rows, t0 = [], time.perf_counter()
    for start in range(0, len(jobs), a.batch):
        part = jobs[start : start + a.batch]
        chats = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i]}], tokenize=False,
                                         add_generation_prompt=True) for i, _ in part]
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(a.device)
        torch.manual_seed(1000 + start)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=0.8, top_p=0.95, repetition_penalty=1.15,
                                 max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        for (i, s), ids in zip(part, out[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(ids, skip_special_tokens=True).strip()
            if len(text) > (200 if a.limit is None else 0):
                rows.append({"prompt": PROMPTS[i], "seed": s, "text": text})
        print(f"{start + len(part)}/{len(jobs)} samples, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_output(a.out, gzip.compress(lines.encode("utf-8"), compresslevel=9, mtime=0), "--out")
    tokens = sum(len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in rows)
    print(json.dumps({"texts": len(rows), "tokens": tokens, "prompts": len(PROMPTS), "seeds": len(SEEDS),
                      "seconds": round(time.perf_counter() - t0, 1), "device": a.device}))


if __name__ == "__main__":
    main()
