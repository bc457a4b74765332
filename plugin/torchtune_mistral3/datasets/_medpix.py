"""MedPix-VQA: message transform, leakage-free case split, bad-row handling and the dataset builders."""

import hashlib
import io
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, ReadInstruction, concatenate_datasets, config, load_dataset
from datasets import Image as ImageFeature
from datasets.exceptions import DatasetGenerationError
from PIL import Image
from torchtune.data import Message
from torchtune.datasets import SFTDataset
from torchtune.datasets._sft import SFTTransform
from torchtune.modules.transforms import Transform

from ._packed import PackedDataset

log = logging.getLogger(__name__)

MEDPIX_SOURCE = "mmoukouba/MedPix-VQA"
MEDPIX_SAMPLE_DIR = Path(__file__).resolve().parents[1] / "assets" / "medpix_sample"

# MedPix-VQA field names; column_map maps them to the source's columns. torchtune's vqa_dataset keys are
# accepted as aliases so that a vqa_dataset column_map works unchanged.
_FIELDS = ("image_id", "question", "answer", "mode", "case_id")
_REQUIRED = ("image_id", "question", "answer")
_ALIASES = {"image": "image_id", "input": "question", "output": "answer"}
# Provenance of every row, carried through splitting and filtering, for error messages.
_ROW = "__medpix_row__"
_SPLIT = "__medpix_split__"


def _resolve_columns(column_map: Optional[Mapping[str, str]]) -> Dict[str, str]:
    columns = {f: f for f in _FIELDS}
    for key, column in (column_map or {}).items():
        field = _ALIASES.get(key, key)
        if field not in columns:
            raise ValueError(f"column_map key {key!r} is not one of {list(_FIELDS)} (or {list(_ALIASES)})")
        columns[field] = column
    return columns


def open_image(value: Any, image_dir: Optional[Union[str, Path]] = None, load: bool = True) -> Image.Image:
    """Decode an image cell: a PIL image, a ``{"bytes", "path"}`` dict (an undecoded HF ``Image``), or a path.

    Args:
        value (Any): the cell.
        image_dir (Optional[Union[str, Path]]): directory that relative paths are resolved against. Default is None.
        load (bool): decode the pixels; False reads the header only (size and mode). Default is True.

    Returns:
        Image.Image: the image (pixels loaded when ``load``).

    Raises:
        ValueError: if the cell is empty or cannot be decoded.
    """
    if isinstance(value, Image.Image):
        return value
    source: Any
    if isinstance(value, Mapping):
        if value.get("bytes"):
            source = io.BytesIO(value["bytes"])
        elif value.get("path"):
            source = value["path"]
        else:
            raise ValueError("the image cell holds neither bytes nor a path")
    elif isinstance(value, (str, Path)) and str(value):
        source = value
    else:
        raise ValueError(f"cannot read an image from a {type(value).__name__} cell")
    if not isinstance(source, io.BytesIO):
        path = Path(source)
        if not path.is_absolute() and image_dir is not None:
            path = Path(image_dir) / path
        if not path.is_file():
            raise ValueError(f"image file {path} does not exist (image_dir={image_dir})")
        source = path
    try:
        image = Image.open(source)
        if load:
            image.load()
    except Exception as e:  # Pillow raises many types for corrupt data
        raise ValueError(f"cannot decode the image: {type(e).__name__}: {e}") from e
    return image


class MedPixToMessages(Transform):
    """MedPix row -> torchtune messages: user = image + question (masked), assistant = answer (trained on).

    ``mode`` and ``case_id`` are returned beside the messages as metadata for evaluation; they are not part of the
    conversation. Question and answer are stripped of surrounding whitespace.

    Args:
        column_map (Optional[Mapping[str, str]]): MedPix field -> column of the source, for fields ``image_id``,
            ``question``, ``answer``, ``mode``, ``case_id`` (or torchtune's ``image``/``input``/``output``).
            Default is None (the MedPix names).
        image_dir (Optional[Union[str, Path]]): directory for relative image paths. Default is None.
        new_system_prompt (Optional[str]): system prompt to add. Default is None (none, as in the reference
            recipes).
    """

    def __init__(
        self,
        column_map: Optional[Mapping[str, str]] = None,
        image_dir: Optional[Union[str, Path]] = None,
        new_system_prompt: Optional[str] = None,
    ):
        self.columns = _resolve_columns(column_map)
        self.image_dir = image_dir
        self.new_system_prompt = new_system_prompt

    def __call__(self, sample: Mapping[str, Any], load_image: bool = True) -> Dict[str, Any]:
        """Build the conversation of one row.

        Args:
            sample (Mapping[str, Any]): one source row.
            load_image (bool): decode the image; False opens its header only (for length checks). Default is True.

        Returns:
            Dict[str, Any]: ``messages`` (List[Message]), ``mode`` and ``case_id`` (str or None).

        Raises:
            ValueError: naming the column, if a required cell is missing, empty or undecodable.
        """
        cells = {}
        for field in _REQUIRED:
            column = self.columns[field]
            if column not in sample:
                raise ValueError(f"column {column!r} is missing (columns: {sorted(sample)}); set column_map")
            if sample[column] is None:
                raise ValueError(f"column {column!r} is empty")
            cells[field] = sample[column]
        for field in ("question", "answer"):
            if not isinstance(cells[field], str) or not cells[field].strip():
                raise ValueError(f"column {self.columns[field]!r} is empty or not text: {cells[field]!r}")
        try:
            image = open_image(cells["image_id"], self.image_dir, load=load_image)
        except ValueError as e:
            raise ValueError(f"column {self.columns['image_id']!r}: {e}") from e
        messages = []
        if self.new_system_prompt is not None:
            messages.append(Message(role="system", content=self.new_system_prompt, masked=True, eot=True))
        user = [{"type": "image", "content": image}, {"type": "text", "content": cells["question"].strip()}]
        messages.append(Message(role="user", content=user, masked=True, eot=True))
        messages.append(Message(role="assistant", content=cells["answer"].strip(), masked=False, eot=True))
        meta = {f: sample.get(self.columns[f]) for f in ("mode", "case_id")}
        return {"messages": messages, **{f: None if v is None else str(v) for f, v in meta.items()}}


def validation_cases(case_ids: Iterable[Any], val_fraction: float, seed: int = 0) -> Set[str]:
    """Choose the validation cases of a case-level split.

    The distinct case ids are ranked by ``sha256(f"{seed}:{case_id}")`` and the first
    ``round(val_fraction * n_cases)`` (at least 1, at most n_cases - 1) form the validation set. The result depends
    only on the set of case ids and the seed (not on row order), and all rows of a case land on the same side.

    Args:
        case_ids (Iterable[Any]): the case id of every row (duplicates allowed).
        val_fraction (float): fraction of the cases for validation, in [0, 1).
        seed (int): changes the draw. Default is 0.

    Returns:
        Set[str]: the validation case ids (as strings).

    Raises:
        ValueError: if ``val_fraction`` is outside [0, 1).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    unique = sorted({str(c) for c in case_ids})
    if val_fraction == 0 or len(unique) < 2:
        return set()
    k = min(max(1, round(val_fraction * len(unique))), len(unique) - 1)
    ranked = sorted(unique, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    return set(ranked[:k])


def _null_image_rows(data: Dataset, column: str) -> List[int]:
    """Positions whose image cell is null (or a struct with neither bytes nor path), read as Arrow, undecoded."""
    bad, offset = [], 0
    for batch in data.select_columns([column]).with_format("arrow").iter(batch_size=1024):
        cells = batch.column(0)
        null = pc.is_null(cells)
        if pa.types.is_struct(cells.type) and {"bytes", "path"} <= {f.name for f in cells.type}:
            empty = pc.and_(pc.is_null(pc.struct_field(cells, "bytes")), pc.is_null(pc.struct_field(cells, "path")))
            null = pc.or_(null, empty)
        bad += [offset + i for i, v in enumerate(null.to_pylist()) if v]
        offset += len(cells)
    return bad


def _find_bad_rows(
    data: Dataset, columns: Dict[str, str], decode_images: bool, image_dir: Optional[str]
) -> Dict[int, str]:
    """Position -> problem for rows with an empty question/answer, a null image, or (optionally) an undecodable one."""
    bad: Dict[int, str] = {}
    for field in ("question", "answer"):
        for i, v in enumerate(data[columns[field]]):
            if not isinstance(v, str) or not v.strip():
                bad.setdefault(i, f"column {columns[field]!r} is empty or not text: {v!r}")
    for i in _null_image_rows(data, columns["image_id"]):
        bad.setdefault(i, f"column {columns['image_id']!r} is empty")
    if decode_images:
        for i, row in enumerate(data.select_columns([columns["image_id"]])):
            if i in bad:
                continue
            try:
                open_image(row[columns["image_id"]], image_dir)
            except ValueError as e:
                bad[i] = f"column {columns['image_id']!r}: {e}"
    return bad


def _measure_rows(
    data: Dataset, message_transform: Transform, model_transform: Transform
) -> Tuple[List[Optional[int]], Dict[int, str]]:
    """Token count of every row after truncation, and position -> problem for rows ``max_seq_len`` cuts off.

    A row whose answer would start after ``max_seq_len`` is a problem (its count is None). Uses the model
    transform's ``check_length(messages)`` (:class:`~torchtune_mistral3.models.mistral3.Mistral3Transform`),
    with image headers only (no pixels).
    """
    check = model_transform.check_length
    lengths: List[Optional[int]] = []
    bad: Dict[int, str] = {}
    for i, row in enumerate(data):
        try:
            lengths.append(check(message_transform(row, load_image=False)["messages"]))
        except ValueError as e:  # the data errors of the transforms (a too-long sample, an unreadable image)
            lengths.append(None)
            bad[i] = str(e)
    return lengths, bad


def _log_cut_rows(
    data: Dataset, lengths: List[Optional[int]], message_transform: Transform, model_transform: Transform, source: str
) -> None:
    """Warn, with their count, about rows that ``max_seq_len`` cuts inside the answer (they lose ``</s>``).

    A kept row fills ``max_seq_len`` exactly when it was cut (MedPix's image comes before the answer, so a cut
    inside an image leaves no answer and the row is already refused); the untruncated count tells a cut row
    from one that fits to the token.
    """
    limit, full = getattr(model_transform, "max_seq_len", None), getattr(model_transform, "untruncated_length", None)
    if limit is None or full is None:
        return
    cut = {}
    for i, n in enumerate(lengths):
        if n == limit:
            total = full(message_transform(data[i], load_image=False)["messages"])
            if total > limit:
                cut[i] = total
    if cut:
        i = min(cut)
        log.warning(
            "%s: %d of %d rows are longer than max_seq_len=%d: their answers are cut and lose </s> (first: split %r "
            "row %d, %d tokens); raise tokenizer.max_seq_len to train them whole",
            source, len(cut), len(lengths), limit, data[_SPLIT][i], data[_ROW][i], cut[i],
        )


def _drop_bad_rows(data: Dataset, bad: Dict[int, str], source: str, skip: bool, kind: str) -> Dataset:
    """Raise for the first bad row (naming its split and row), or drop them all and log how many."""
    if not bad:
        return data
    rows, names = data[_ROW], data[_SPLIT]
    i = min(bad)
    first = f"{source} split {names[i]!r} row {rows[i]}: {bad[i].rstrip('.')}"
    if not skip:
        raise ValueError(f"{first}. Fix the data, or pass skip_bad_rows=True to skip such rows")
    log.warning("%s: skipped %d %s row(s) of %d; first: %s", source, len(bad), kind, len(data), first)
    return data.select([i for i in range(len(data)) if i not in bad])


class MedPixDataset(SFTDataset):
    """``SFTDataset`` over an already prepared HF dataset; errors from a row name its source split and row.

    Args:
        data (Dataset): the rows (with provenance columns).
        message_transform (Transform): row -> messages.
        model_transform (Transform): messages -> tokens, mask, images.
        source (str): data source, for messages.
    """

    def __init__(self, data: Dataset, message_transform: Transform, model_transform: Transform, source: str):
        self._data = data
        self._message_transform = message_transform
        self._model_transform = model_transform
        self._prepare_sample = SFTTransform(message_transform=message_transform, model_transform=model_transform)
        self._source = source

    def __getitem__(self, index: int) -> Dict[str, Any]:
        """Transform row ``index``.

        Args:
            index (int): position in this dataset.

        Returns:
            Dict[str, Any]: tokens, mask, labels, encoder_input, mode, case_id.

        Raises:
            ValueError: naming the source split, row and column, if the row's data cannot be transformed (an
                undecodable image, a missing cell, a conversation the tokenizer rejects). Other exceptions (a
                bug in code, not in the data) keep their type and traceback, with the row added as a note.
        """
        row = self._data[index]
        where = f"{self._source} split {row.get(_SPLIT)!r} row {row.get(_ROW)}"
        try:
            return self._prepare_sample(row)
        except ValueError as e:  # the data errors the transforms raise
            raise ValueError(f"{where}: {e}") from e
        except Exception as e:
            e.add_note(f"while transforming {where}")
            raise


def _local_files(data_files: Any) -> List[Path]:
    """The local files ``data_files`` names (a path, glob, list or split -> paths dict)."""
    if isinstance(data_files, Mapping):
        return [f for v in data_files.values() for f in _local_files(v)]
    if isinstance(data_files, (list, tuple)):
        return [f for v in data_files for f in _local_files(v)]
    if not isinstance(data_files, (str, Path)):
        return []
    path = Path(data_files)
    return sorted(path.parent.glob(path.name)) if any(c in path.name for c in "*?[") else [path]


def _empty_files(data_files: Any) -> List[str]:
    """Local data files that hold no rows (a parquet file of 0 rows, or a 0-byte file)."""
    empty = []
    for path in _local_files(data_files):
        if not path.is_file():
            continue
        if path.stat().st_size == 0 or (path.suffix == ".parquet" and pq.read_metadata(path).num_rows == 0):
            empty.append(str(path))
    return empty


def _load_splits(source: str, data_files: Any, **load_dataset_kwargs: Any) -> DatasetDict:
    try:
        loaded = load_dataset(source, data_files=data_files, **load_dataset_kwargs)
    except DatasetGenerationError as e:
        empty = _empty_files(data_files)
        if empty:
            raise ValueError(
                f"{source} data file(s) {empty} hold 0 rows: fill them or leave them out of data_files"
            ) from e
        raise
    except ConnectionError as e:  # no network and not in the local cache
        raise ConnectionError(
            f"{e}: {source!r} is not in the local Hugging Face cache ({config.HF_DATASETS_CACHE}) and the hub cannot "
            f"be reached. Download it once where the hub is reachable, with the same HF_HOME "
            f"(python -c \"import datasets; datasets.load_dataset('{source}')\"), or point the config at local "
            "files: dataset.source=parquet dataset.data_files=<files> (dataset_val too)"
        ) from e
    return DatasetDict({"train": loaded}) if isinstance(loaded, Dataset) else loaded


def _with_provenance(data: Dataset, split_name: str, image_column: str) -> Dataset:
    if image_column in data.features and isinstance(data.features[image_column], ImageFeature):
        data = data.cast_column(image_column, ImageFeature(decode=False))  # decode per row, errors per row
    data = data.add_column(_ROW, list(range(len(data))))
    return data.add_column(_SPLIT, [split_name] * len(data))


def medpix_dataset(
    model_transform: Transform,
    *,
    source: str = MEDPIX_SOURCE,
    column_map: Optional[Dict[str, str]] = None,
    split: str = "train",
    image_dir: Optional[str] = None,
    data_files: Optional[Any] = None,
    val_fraction: float = 0.15,
    split_by_case: Optional[bool] = None,
    split_seed: int = 0,
    skip_bad_rows: bool = False,
    check_lengths: bool = True,
    new_system_prompt: Optional[str] = None,
    filter_fn: Optional[Callable] = None,
    packed: bool = False,
    **load_dataset_kwargs: Dict[str, Any],
) -> Union[MedPixDataset, PackedDataset]:
    """MedPix-VQA (or any data in its schema) for visual question answering, as torchtune's ``vqa_dataset``.

    Columns (MedPix-VQA schema; other names via ``column_map``):

    ========== ================================================== =====================================
    field      content                                            use
    ========== ================================================== =====================================
    image_id   image: HF ``Image`` feature, ``{"bytes","path"}``  user turn, before the question
               dict, or a path (relative to ``image_dir``)
    question   text                                               user turn (not trained on)
    answer     text                                               assistant turn (trained on, + ``</s>``)
    mode       text (optional)                                    metadata in the sample, not the batch
    case_id    text (optional)                                    metadata; the unit of the split
    ========== ================================================== =====================================

    Splits: if the source has several splits including the requested one (the hub data set has ``train`` 17,420
    and ``validation`` 3,080 rows) it is used, slices such as ``"train[:1000]"`` included. If the source has one
    split only (e.g. one local file) or lacks the requested one, or ``split_by_case=True``, all source splits are
    pooled and divided by ``case_id`` with :func:`validation_cases`: ``split="validation"`` gets the chosen cases,
    ``split="train"`` the others, so no case is on both sides and the result is the same on every run and every
    rank. ``split_by_case=False`` uses a single-split source as it is.

    Bad rows (empty question or answer, null image) are found when the dataset is built: a ``ValueError`` names
    the split, row and column, or with ``skip_bad_rows=True`` they are dropped and their count logged;
    ``skip_bad_rows=True`` also decodes every image once to drop undecodable ones. Otherwise an undecodable image
    raises when its row is read, naming the row and column (or when the dataset is built, if even its header
    is unreadable).

    Too long: after ``filter_fn``, every row is tokenized with its images reduced to their token grid (sizes
    from the image headers, no pixels processed) and a row whose answer would start after the model
    transform's ``max_seq_len`` is a bad row as above (error naming the row, its token count and
    ``max_seq_len``, or skipped and counted with ``skip_bad_rows=True``). ``check_lengths=False`` turns this off.

    Packed (``packed=True``): the measured token counts pack whole samples into sequences of ``max_seq_len``
    tokens with :func:`~torchtune_mistral3.datasets.pack_first_fit` (a pure function of the rows, so the same
    on every rank and run); a sample longer than ``max_seq_len`` is truncated as above and fills a pack alone.
    Collate the packs with :func:`~torchtune_mistral3.data.padded_collate_packed_mistral3` (the recipe does).

    Args:
        model_transform (Transform): e.g. :func:`~torchtune_mistral3.models.mistral3.mistral3_transform`.
        source (str): HF hub id, or a builder (``"parquet"``, ``"json"``, ``"arrow"``, ``"imagefolder"``) with
            ``data_files`` / ``data_dir``. Default is ``"mmoukouba/MedPix-VQA"``.
        column_map (Optional[Dict[str, str]]): field -> source column (see :class:`MedPixToMessages`).
            Default is None.
        split (str): ``"train"``, ``"validation"``, or any split (slice) of the source. Default is ``"train"``.
        image_dir (Optional[str]): directory for relative image paths. Default is None.
        data_files (Optional[Any]): passed to ``load_dataset``. Default is None.
        val_fraction (float): fraction of the cases for validation when splitting by case. Default is 0.15.
        split_by_case (Optional[bool]): None: when the source has one split only or lacks ``split``; True:
            always (pooling the source's splits); False: never. Default is None.
        split_seed (int): seed of the case split. Default is 0.
        skip_bad_rows (bool): drop bad rows (logged) instead of raising. Default is False.
        check_lengths (bool): find, when the dataset is built, the rows whose answer ``max_seq_len`` would cut
            off entirely (the model transform's ``check_length``; image headers only, no pixels). Default is True.
        new_system_prompt (Optional[str]): system prompt for every sample. Default is None.
        filter_fn (Optional[Callable]): ``datasets.Dataset.filter`` predicate on raw rows (images undecoded).
            Default is None.
        packed (bool): pack whole samples (with their images) into sequences of exactly the model transform's
            ``max_seq_len`` tokens (:class:`~torchtune_mistral3.datasets.PackedDataset`); implies the length check
            (every row is measured, from image headers). Default is False.
        **load_dataset_kwargs (Dict[str, Any]): other ``load_dataset`` arguments (``name``, ``data_dir``, ...).

    Returns:
        Union[MedPixDataset, PackedDataset]: an ``SFTDataset`` whose samples hold ``tokens``, ``mask``,
        ``labels``, ``encoder_input``, ``mode`` and ``case_id``; with ``packed=True`` a :class:`PackedDataset`
        of those samples.

    Raises:
        ValueError: if ``packed`` without a measuring model transform or ``max_seq_len``, a required column is
            missing, the split cannot be made, or a bad row is found.

    Example:
        >>> ds = medpix_dataset(transform)                                   # the hub data set
        >>> ds = medpix_dataset(transform, source="parquet", data_files="medpix.parquet", split="validation")

    The same from a config::

        dataset:
          _component_: torchtune_mistral3.datasets.medpix_dataset
          source: parquet
          data_files: /data/medpix/*.parquet
          split: train
    """
    columns = _resolve_columns(column_map)
    splits = _load_splits(source, data_files, **load_dataset_kwargs)
    base = split.split("[")[0].split("+")[0]
    if split_by_case is None:  # one split only (e.g. one local file), or not the one asked for: split by case
        pool = base not in splits or (len(splits) == 1 and base in ("train", "validation"))
        if pool:
            log.info("%s has split(s) %s: splitting by case_id for %r", source, list(splits), split)
    else:
        pool = split_by_case
    if not pool and base not in splits:
        raise ValueError(f"{source} has no split {split!r} (has {list(splits)}); set split_by_case=True")

    for name, part in splits.items():
        needed = _REQUIRED + (("case_id",) if pool else ())
        missing = [columns[f] for f in needed if columns[f] not in part.column_names]
        if missing:
            raise ValueError(
                f"{source} split {name!r} has no column(s) {missing} (columns: {part.column_names}); "
                "map them with column_map, e.g. column_map={'image_id': 'image', 'question': 'input'}"
                + (" (case_id is needed to split by case; split_by_case=False uses the split as it is)" if pool else "")
            )

    if not pool:
        data = _with_provenance(splits[base], base, columns["image_id"])
        if split != base:
            instructions = ReadInstruction.from_spec(split).to_absolute({base: len(data)})
            data = data.select([i for ins in instructions for i in range(ins.from_, ins.to)])
    else:
        if base not in ("train", "validation") or split != base:
            raise ValueError(f"splitting by case_id gives 'train' and 'validation' (no slices), not {split!r}")
        data = concatenate_datasets([_with_provenance(p, n, columns["image_id"]) for n, p in splits.items()])
        val = validation_cases(data[columns["case_id"]], val_fraction, split_seed)
        keep = [i for i, c in enumerate(data[columns["case_id"]]) if (str(c) in val) == (base == "validation")]
        data = data.select(keep)
        log.info("%s: %d cases for validation, %s split has %d rows", source, len(val), base, len(data))

    bad = _find_bad_rows(data, columns, decode_images=skip_bad_rows, image_dir=image_dir)
    data = _drop_bad_rows(data, bad, source, skip_bad_rows, "bad")
    if filter_fn is not None:
        data = data.filter(filter_fn)
    message_transform = MedPixToMessages(column_map, image_dir=image_dir, new_system_prompt=new_system_prompt)
    measure = (check_lengths or packed) and hasattr(model_transform, "check_length")
    if packed and not measure:
        raise ValueError(
            f"packed=True needs a model transform that measures samples without pixels (check_length), "
            f"such as torchtune_mistral3.models.mistral3.mistral3_transform; got {type(model_transform).__name__}"
        )
    if packed and getattr(model_transform, "max_seq_len", None) is None:
        raise ValueError("packed=True packs to the tokenizer's max_seq_len: set tokenizer.max_seq_len")
    if measure:
        lengths, too_long = _measure_rows(data, message_transform, model_transform)
        _log_cut_rows(data, lengths, message_transform, model_transform, source)
        data = _drop_bad_rows(data, too_long, source, skip_bad_rows, "too long")
        lengths = [n for n in lengths if n is not None]
    dataset = MedPixDataset(data, message_transform, model_transform, source)
    if not packed:
        return dataset
    packs = PackedDataset(dataset, lengths, model_transform.max_seq_len, padding_idx=model_transform.pad_id)
    fill = sum(lengths) / max(len(packs) * packs.max_seq_len, 1)
    log.info("%s: %d samples packed into %d sequences of %d tokens (%.1f%% real tokens)",
             source, len(dataset), len(packs), packs.max_seq_len, 100 * fill)
    return packs


def medpix_sample_dataset(
    model_transform: Transform, *, split: str = "train", **kwargs: Any
) -> Union[MedPixDataset, PackedDataset]:
    """The MedPix-schema sample shipped with the package: real (MIT-licensed) CT, MR, X-ray, NM and US images.

    33 question/answer rows on 12 cases: ``train.parquet`` 24 rows of 9 cases, ``validation.parquet`` 9 rows of 3
    cases, split by :func:`validation_cases`; see ``assets/medpix_sample/README.md`` for provenance and licence.

    Args:
        model_transform (Transform): the model transform.
        split (str): ``"train"`` or ``"validation"``. Default is ``"train"``.
        **kwargs (Any): other :func:`medpix_dataset` arguments (``packed=True`` included).

    Returns:
        Union[MedPixDataset, PackedDataset]: the dataset.
    """
    files = {name: str(MEDPIX_SAMPLE_DIR / f"{name}.parquet") for name in ("train", "validation")}
    return medpix_dataset(model_transform, source="parquet", data_files=files, split=split, **kwargs)
