"""Samples per second of the data path on one core: the plugin's transform + collate vs transformers' processor.

    python bench/data_throughput.py [--samples 48] [--sizes 512 768 1024] [--max-image-size 1540] [--out PATH]

Both sides get the same MedPix-schema conversations: the bundled sample's real images (CT, MR, X-ray,
nuclear medicine, ultrasound), each resized so its longest side is one of ``--sizes`` (MedPix images are
512-1024 px), with the row's question and answer.

- plugin: ``Mistral3Transform`` (image decode, medical-image conversion, Pixtral resize + normalise, tekken chat
  encoding with the [IMG] layout, loss mask) then ``padded_collate_mistral3`` on batches of 4;
- transformers: ``PixtralImageProcessorPil`` (resize + normalise; its torchvision processor cannot be
  imported beside CPU torch) plus tokenisation of the same chat text with transformers' fast tekken
  tokenizer (``convert_tekken_tokenizer``), batches of 4 padded to the longest. The [IMG] expansion that
  ``PixtralProcessor`` adds is not counted on its side, which favours transformers.

Prints samples/s of both and the ratio (plugin / transformers) and writes them as JSON to ``--out``, by default
``$TMPDIR/torchtune_mistral3_data_throughput.json`` (``/tmp`` without ``TMPDIR``), never into the repository:
the committed ``bench/results/data_throughput.json`` changes only with ``--out bench/results/data_throughput.json``.
"""

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchtune.data import Message  # noqa: E402
from torchtune_mistral3.data import padded_collate_mistral3  # noqa: E402
from torchtune_mistral3.datasets import MEDPIX_SAMPLE_DIR  # noqa: E402
from torchtune_mistral3.models.mistral3 import mistral3_transform  # noqa: E402

DEFAULT_OUT = Path(tempfile.gettempdir()) / "torchtune_mistral3_data_throughput.json"  # $TMPDIR, else /tmp


def _rows(n, sizes):
    table = pq.read_table(MEDPIX_SAMPLE_DIR / "train.parquet").to_pylist()
    rows = []
    for i in range(n):
        row = table[i % len(table)]
        image = Image.open(io.BytesIO(row["image_id"]["bytes"]))
        image.load()
        side = sizes[i % len(sizes)]
        scale = side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        rows.append((buf.getvalue(), row["question"], row["answer"]))
    return rows


def _plugin(rows, tekken, max_image_size, batch=4):
    transform = mistral3_transform(tekken, max_seq_len=None, max_image_size=max_image_size)
    start = time.perf_counter()
    samples = []
    for png, question, answer in rows:
        image = Image.open(io.BytesIO(png))
        messages = [
            Message("user", [{"type": "image", "content": image}, {"type": "text", "content": question}]),
            Message("assistant", answer),
        ]
        samples.append(transform({"messages": messages}))
        if len(samples) == batch:
            padded_collate_mistral3(
                [{"tokens": s["tokens"], "labels": s["tokens"], "encoder_input": s["encoder_input"]} for s in samples]
            )
            samples = []
    return len(rows) / (time.perf_counter() - start)


def _transformers(rows, tekken, max_image_size, batch=4):
    from transformers.integrations.mistral import convert_tekken_tokenizer
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    processor = PixtralImageProcessorPil(size={"longest_edge": max_image_size}, patch_size={"height": 28, "width": 28})
    tokenizer = convert_tekken_tokenizer(tekken)
    start = time.perf_counter()
    images, texts = [], []
    for png, question, answer in rows:
        images.append(Image.open(io.BytesIO(png)).convert("RGB"))
        texts.append(f"<s>[INST][IMG]{question}[/INST]{answer}</s>")
        if len(images) == batch:
            processor(images, return_tensors="pt")
            tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
            images, texts = [], []
    return len(rows) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--max-image-size", type=int, default=1540)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import mistral_common

    tekken = str(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json")
    rows = _rows(args.samples, args.sizes)
    _plugin(rows[:4], tekken, args.max_image_size)  # warm-up (tokenizer load, first PIL calls)
    _transformers(rows[:4], tekken, args.max_image_size)
    ours = max(_plugin(rows, tekken, args.max_image_size) for _ in range(args.repeats))
    theirs = max(_transformers(rows, tekken, args.max_image_size) for _ in range(args.repeats))
    result = {
        "samples": args.samples,
        "image_sizes": args.sizes,
        "max_image_size": args.max_image_size,
        "threads": 1,
        "plugin_samples_per_s": round(ours, 2),
        "transformers_samples_per_s": round(theirs, 2),
        "ratio_plugin_over_transformers": round(ours / theirs, 3),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
