"""Hand-made dataset files in the real on-disk formats (CIFAR pickles, Tiny ImageNet tree, ImageFolder tree,
WikiText raw files, GPT-1 style vocab/merges), small enough for tests. Imported by tests/test_data*.py."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

CIFAR_LAYOUT = {
    # variant: (folder, train files, test files, meta file, label key, label-names key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                "labels", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names", 100),
}


def make_cifar(root: Path, variant: str = "cifar10", per_file: int = 8, seed: int = 0) -> dict:
    """Write a CIFAR folder in the python-pickle format under `root`; returns the arrays written
    ({"train": (images NHWC, labels), "test": ...}) for comparison."""
    folder, train_files, test_files, meta_file, label_key, names_key, n_classes = CIFAR_LAYOUT[variant]
    rng = np.random.default_rng(seed)
    d = Path(root) / folder
    d.mkdir(parents=True, exist_ok=True)
    written: dict = {}
    for split, files in (("train", train_files), ("test", test_files)):
        imgs, labs = [], []
        for name in files:
            data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)  # channel-major rows
            labels = [int(v) for v in rng.integers(0, n_classes, per_file)]
            entry = {"batch_label": f"fake {name}", "data": data, label_key: labels,
                     "filenames": [f"img_{name}_{i}.png" for i in range(per_file)]}
            if variant == "cifar100":
                entry["coarse_labels"] = [v // 5 for v in labels]
            with open(d / name, "wb") as f:
                pickle.dump(entry, f)
            imgs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labs.extend(labels)
        written[split] = (np.concatenate(imgs), np.asarray(labs))
    meta = {names_key: [f"class{i}" for i in range(n_classes)]}
    if variant == "cifar10":
        meta.update(num_cases_per_batch=per_file, num_vis=3072)
    else:
        meta["coarse_label_names"] = [f"super{i}" for i in range(20)]
    with open(d / meta_file, "wb") as f:
        pickle.dump(meta, f)
    return written


def _save_image(path: Path, rng: np.random.Generator, size: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def make_tiny_imagenet(root: Path, wnids=("n01443537", "n01629819", "n01641577"), train_per_class: int = 3,
                       val_per_class: int = 2, size: int = 16, seed: int = 0) -> Path:
    """`<root>/tiny-imagenet-200` as the zip unpacks: wnids.txt, words.txt, train/<wnid>/images/*.JPEG with
    <wnid>_boxes.txt, val/images/val_<k>.JPEG + val/val_annotations.txt, test/images/."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "tiny-imagenet-200"
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (base / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    for w in wnids:
        boxes = []
        for i in range(train_per_class):
            name = f"{w}_{i}.JPEG"
            _save_image(base / "train" / w / "images" / name, rng, size)
            boxes.append(f"{name}\t0\t0\t{size - 1}\t{size - 1}\n")
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    annotations, k = [], 0
    for _ in range(val_per_class):
        for w in wnids:
            name = f"val_{k}.JPEG"
            _save_image(base / "val" / "images" / name, rng, size)
            annotations.append(f"{name}\t{w}\t0\t0\t{size - 1}\t{size - 1}\n")
            k += 1
    (base / "val" / "val_annotations.txt").write_text("".join(annotations))
    _save_image(base / "test" / "images" / "test_0.JPEG", rng, size)
    return base


def make_image_folder(root: Path, classes=("n01440764", "n01443537"), train_per_class: int = 3,
                      val_per_class: int = 2, size: int = 20, seed: int = 0) -> Path:
    """An ImageNet-style `<root>/{train,val}/<wnid>/*.JPEG` tree."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in classes:
            for i in range(n):
                _save_image(Path(root) / split / c / f"{c}_{split}_{i}.JPEG", rng, size)
    return Path(root)


# A tiny GPT-1-style BPE: characters with the end-of-word marker, a few merges, lower-case words.
TINY_MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "s a", "sa t</w>", "o n</w>", "m a", "ma t</w>"]


def make_gpt1_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt in the openai-gpt format (merges header line, `</w>` end-of-word suffix)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = [".", ",", "=", "<unk>"]
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    symbols += list(letters) + [f"{c}</w>" for c in letters] + [".</w>", ",</w>", "=</w>"]
    for merge in TINY_MERGES:
        symbols.append(merge.replace(" ", ""))
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")
    return folder


WIKI_TEXT = {
    "train": " \n = The Cat = \n \n The cat sat on the mat . The cat sat . \n The mat , the cat . \n",
    "valid": " \n = Mat = \n \n The mat sat on the cat . \n",
    "test": " \n = On = \n \n On the mat the cat sat , the end . \n",
}


def make_wikitext_raw(root: Path, repeat: int = 1) -> Path:
    """`<root>/wikitext-2-raw/wiki.{train,valid,test}.raw` (the layout of wikitext-2-raw-v1.zip)."""
    folder = Path(root) / "wikitext-2-raw"
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in WIKI_TEXT.items():
        (folder / f"wiki.{split}.raw").write_text(text * repeat)
    return folder


def make_user_images(root: Path, splits: dict, classes=("cat", "dog"), size=(24, 16), seed: int = 0,
                     mode: str = "RGB") -> Path:
    """A user's image tree: `splits` maps a sub-folder ("train", "val", "test", or "" for a flat layout) to the
    images per class; files alternate PNG / JPEG, sizes vary around `size` (width, height), and each class has
    its own mean colour (so a model can learn it)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for split, per_class in splits.items():
        for ci, c in enumerate(classes):
            folder = Path(root) / split / c if split else Path(root) / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = size[0] + (i % 3) * 2, size[1] + (i % 2) * 4
                base = 40 + 170 * ci / max(len(classes) - 1, 1)
                pixels = np.clip(rng.normal(base, 30, (h, w, channels)), 0, 255).astype(np.uint8)
                img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
                img.save(folder / (f"{split or 'all'}_{c}_{i}." + ("png" if i % 2 == 0 else "jpg")))
    return Path(root)


def gpt2_style_tokenizer(folder: Path, text: str, vocab_size: int = 300) -> Path:
    """vocab.json + merges.txt in GPT-2's byte-level BPE format, trained on `text` with `tokenizers` and saved
    by its BPE model (the format GPT-2's own files have: byte-to-unicode symbols, `Ġ` for spaces)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))
    return folder


STORY = (
    "The cat sat on the mat.\n"
    "  The dog ran far   away, quickly!\n"
    "\n"
    "\n"
    "   Indented line with trailing spaces   \n"
    "Numbers 12 345 and symbols #$%&.\n"
    "Unicode: café, naïve, 東京, emoji 🙂.\n"
    "\ttab\tseparated\tline\n"
)


def make_text_files(folder: Path, repeat: int = 20, seed: int = 0) -> dict[str, Path]:
    """train/valid/test .txt files: shuffled lines of STORY (with whitespace runs, blank lines, non-ASCII)."""
    rng = np.random.default_rng(seed)
    lines = STORY.splitlines(keepends=True)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", repeat), ("valid", max(2, repeat // 5)), ("test", max(2, repeat // 5))):
        text = "".join("".join(rng.permutation(lines)) for _ in range(n))
        files[split] = folder / f"{split}.txt"
        files[split].write_text(text, encoding="utf-8")
    return files
