"""Sources of raw documents, read with one schema: into Ray Datasets (`read_source`), or as pandas frames without
Ray (`read_tasks`, for the local executor), the same rows in the same order either way.

Every row has: key, id (the source's own id, kept through the pipeline), source,
text, meta (JSON: the record's other fields, and a generator's planted-defect label), planted (that label, '' when
unknown), removed_by ('' while the document is kept; 'read' when quarantined) and reason.

The key is unique per document, made so by the reader from where the document was read, never from the
source's own ids, which two files may reuse: "<source>:<file>:<line>" (jsonl), "<source>:<file>:<row>" (parquet),
"<source>:<file>" (text), "<source>:<row>" (hf), "<source>:<id>" (generated, unique by construction). Removals
(dedup, decontamination) are keyed by it. Ids that repeat within a source are reported by the curation step.

jsonl files may be compressed (.jsonl.gz, .jsonl.zst, also in folders); pyarrow decompresses them.

Kinds:
    jsonl     a .jsonl file or a folder of them; one JSON object per line
    parquet   a .parquet file or a folder of them
    text      a folder of plain-text files (or one file): one document per file, its relative path the id
    hf        Hugging Face `datasets`: a local dataset folder (save_to_disk, or data files), or a hub name when
              the machine is online
    bios      generated web-like profile pages (bioS), with planted defects when `noise` is set
    multihop  generated multi-hop relation facts and training questions (ouro-spec.md §8.3)
    mano      generated Mano modular-arithmetic problems (ouro-spec.md §8.2)

Bad records (malformed JSON, invalid UTF-8, a missing or non-string text field) are quarantined with the
reason, never dropped; a source that does not exist or cannot be read is an error naming it.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from looplm.pipelines import synthetic
from looplm.pipelines.noise import NoiseConfig, plant_defects

KINDS = ("jsonl", "parquet", "text", "hf", "bios", "multihop", "mano")
GENERATED = ("bios", "multihop", "mano")
COLUMNS = ("key", "id", "source", "text", "meta", "planted", "removed_by", "reason")
# A quarantined record keeps this much of its raw content, for the report (a 100 MB line need not travel).
RAW_EXCERPT_CHARS = 2000
BLOCK_ROWS = 1000


class SourceError(RuntimeError):
    """A source that does not exist, cannot be read, or does not fit its kind; the message names it."""


@dataclass(frozen=True)
class SourceConfig:
    name: str
    kind: str
    path: str = ""  # file or folder (jsonl, parquet, text, hf) or a hub dataset name (hf)
    text_field: str = "text"
    id_field: str = "id"
    split: str = "train"  # hf
    weight: float = 1.0  # the source's weight in the training mixture
    skip: tuple[str, ...] = ()  # steps not applied to this source, e.g. quality filters for non-web text
    count: int = 1000  # generated: documents (multihop: question documents, after the fact documents)
    people_per_page: int = 4  # bios
    items_per_doc: int = 20  # multihop questions, mano problems per document
    max_operators: int = 10  # mano: L
    noise: NoiseConfig | None = None  # bios: defects to plant

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"source {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind not in GENERATED and not self.path:
            raise ValueError(f"source {self.name!r}: kind {self.kind} needs a path")
        if self.weight <= 0:
            raise ValueError(f"source {self.name!r}: weight must be positive, got {self.weight}")
        if ":" in self.name:
            raise ValueError(f"source name {self.name!r} may not contain ':' (it separates source and id in keys)")


JSONL_SUFFIXES = tuple(f"{ext}{c}" for ext in (".jsonl", ".json") for c in ("", ".gz", ".zst"))
COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}


def _row(source: str, doc_id: str, text: str, meta: dict, reason: str = "", key: str = "") -> dict:
    planted = str(meta.get("defect", "")) if isinstance(meta, dict) else ""
    return {
        "key": f"{source}:{key or doc_id}",
        "id": doc_id,
        "source": source,
        "text": text,
        "meta": json.dumps(meta, ensure_ascii=False, default=str),
        "planted": planted,
        "removed_by": "read" if reason else "",
        "reason": reason,
    }


def _files(config: SourceConfig, suffixes: tuple[str, ...]) -> list[Path]:
    path = Path(config.path)
    if not path.exists():
        raise SourceError(f"source {config.name!r}: {path} does not exist")
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and (not suffixes or p.name.endswith(suffixes)))
        if not files:
            raise SourceError(f"source {config.name!r}: no {'/'.join(suffixes) or ''} files under {path}")
    for file in files:
        if not os.access(file, os.R_OK):
            raise SourceError(f"source {config.name!r}: {file} cannot be read")
    return files


def check_source(config: SourceConfig) -> None:
    """The checks that need no Ray, run before Ray starts: the path exists, holds files of the kind, and they can
    be read. Raises SourceError naming the source."""
    if config.kind == "jsonl":
        files = _files(config, JSONL_SUFFIXES)
        if not any(_holds_text(f) for f in files):
            raise SourceError(f"source {config.name!r}: {config.path} holds no documents (empty or blank)")
    elif config.kind == "parquet":
        check_parquet(config)
    elif config.kind == "text":
        _files(config, ())
    elif config.kind == "hf" and not Path(config.path).exists() and not _hub_is_reachable():
        raise SourceError(
            f"source {config.name!r}: {config.path!r} is not a local folder, and the Hugging Face hub "
            "cannot be reached (offline, or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)"
        )


def _holds_text(file: Path, chunk: int = 1 << 20) -> bool:
    """Whether a (possibly compressed) file holds anything but whitespace; reads only up to the first such byte."""
    import pyarrow as pa

    if file.stat().st_size == 0:
        return False
    with pa.input_stream(str(file), compression=COMPRESSION.get(file.suffix)) as stream:
        while data := stream.read(chunk):
            if data.strip():
                return True
    return False


def check_parquet(config: SourceConfig) -> list[Path]:
    """The source's parquet files, the first of which must have the text field."""
    import pyarrow.parquet as pq

    files = _files(config, (".parquet",))
    try:
        schema = pq.read_schema(files[0])
    except Exception as err:
        raise SourceError(f"source {config.name!r}: {files[0]} is not readable parquet: {err}") from err
    if config.text_field not in schema.names:
        raise SourceError(
            f"source {config.name!r}: {files[0]} has no text field {config.text_field!r} (columns: "
            f"{', '.join(schema.names)})"
        )
    return files


def decompress(data: bytes, name: str) -> bytes:
    """The bytes of a .gz or .zst file decompressed (by its suffix), unless Ray's reader has already done so (it
    does by suffix too, for some codecs and versions): then the data no longer starts with the codec's magic."""
    import pyarrow as pa

    codec = COMPRESSION.get(Path(name).suffix)
    if codec is None or not data.startswith(MAGIC[codec]):
        return data
    return pa.CompressedInputStream(pa.BufferReader(data), codec).read()


def parse_jsonl(data: bytes, source: str, file_id: str, text_field: str, id_field: str) -> list[dict]:
    """Rows for every non-blank line of a jsonl file; bad lines are quarantined with the reason."""
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        fallback_id = f"{file_id}:{number}"
        key = f"{file_id}:{number}"
        excerpt = raw[:RAW_EXCERPT_CHARS].decode("utf-8", errors="replace")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            rows.append(_row(source, fallback_id, excerpt, {}, f"invalid utf-8 at byte {err.start}", key))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append(_row(source, fallback_id, excerpt, {}, f"malformed json: {err.msg} at column {err.colno}", key))
            continue
        if not isinstance(record, dict):
            rows.append(_row(source, fallback_id, excerpt, {}, f"not a JSON object: {type(record).__name__}", key))
            continue
        doc_id = str(record.pop(id_field, fallback_id))
        text = record.pop(text_field, None)
        if text is None:
            rows.append(_row(source, doc_id, excerpt, record, f"missing text field {text_field!r}", key))
        elif not isinstance(text, str):
            reason = f"text field {text_field!r} is {type(text).__name__}"
            rows.append(_row(source, doc_id, excerpt, record, reason, key))
        else:
            rows.append(_row(source, doc_id, text, record, key=key))
    return rows


def parse_text_file(data: bytes, source: str, file_id: str) -> dict:
    try:
        return _row(source, file_id, data.decode("utf-8"), {"path": file_id})
    except UnicodeDecodeError as err:
        excerpt = data[:RAW_EXCERPT_CHARS].decode("utf-8", errors="replace")
        return _row(source, file_id, excerpt, {"path": file_id}, f"invalid utf-8 at byte {err.start}")


ROW = "__looplm_row"  # a table's row number, added by the reader: the key's last part


def _table_rows(frame: pd.DataFrame, config: SourceConfig, file_id: str = "") -> pd.DataFrame:
    """Our schema from a table with the configured text and id columns (and the reader's row numbers); null or
    non-string text is quarantined."""
    rows = []
    other = [c for c in frame.columns if c not in (config.text_field, config.id_field, ROW)]
    has_id = config.id_field in frame.columns
    prefix = f"{file_id}:" if file_id else ""
    for i, record in enumerate(frame.to_dict("records")):
        key = f"{prefix}{record.get(ROW, i)}"
        text = record[config.text_field]
        doc_id = str(record[config.id_field]) if has_id and record[config.id_field] is not None else key
        meta = {c: record[c] for c in other}
        if not isinstance(text, str):
            kind = "null" if text is None or (isinstance(text, float) and text != text) else type(text).__name__
            rows.append(_row(config.name, doc_id, "", meta, f"text field {config.text_field!r} is {kind}", key))
        else:
            rows.append(_row(config.name, doc_id, text, meta, key=key))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _arrow(frame: pd.DataFrame):
    # Every source yields Arrow blocks: Ray Data 2.60 fails on a batch that spans an Arrow and a pandas block,
    # which a union of a file source and a generated one would otherwise produce.
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False)


def _table_rows_arrow(frame: pd.DataFrame, config: SourceConfig):
    return _arrow(_table_rows(frame, config))


def _parquet_file_rows(paths: pd.DataFrame, config: SourceConfig, root: str):
    """Our schema from parquet files, BLOCK_ROWS rows at a time, keyed by file and row."""
    for path in paths["item"]:
        yield from map(_arrow, _parquet_file_frames(path, config, root))


def _parquet_file_frames(path: str, config: SourceConfig, root: str) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    file_id = str(Path(path).relative_to(root))
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BLOCK_ROWS):
        frame = batch.to_pandas()
        frame[ROW] = range(row, row + len(frame))
        row += len(frame)
        yield _table_rows(frame, config, file_id)


def _jsonl_rows(item: dict, config: SourceConfig, root: str) -> list[dict]:
    path = Path(item["path"])
    file_id = str(path.relative_to(root))
    try:
        data = decompress(item["bytes"], path.name)
    except OSError as err:
        raise SourceError(f"source {config.name!r}: {path} cannot be decompressed: {err}") from err
    return parse_jsonl(data, config.name, file_id, config.text_field, config.id_field)


def _hub_is_reachable(timeout: float = 5.0) -> bool:
    """False at once when offline mode is set, else whether the hub answers within `timeout` seconds (so an
    offline machine gets an error, not a hang in datasets' retries)."""
    if any(os.environ.get(name, "0") not in ("0", "") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hf(config: SourceConfig):
    """A `datasets.Dataset` from a local folder, or from the hub when online; an error naming the source if not."""
    import datasets

    path = Path(config.path)
    try:
        if path.exists():
            if (
                (path / "dataset_info.json").exists()
                or (path / "state.json").exists()
                or (path / "dataset_dict.json").exists()
            ):
                dataset = datasets.load_from_disk(str(path))
            else:
                dataset = datasets.load_dataset(str(path), split=config.split)
        else:
            if not _hub_is_reachable():
                raise SourceError(
                    f"source {config.name!r}: {config.path!r} is not a local folder, and the Hugging Face hub "
                    "cannot be reached (offline, or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)"
                )
            dataset = datasets.load_dataset(config.path, split=config.split)
    except SourceError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the source named either way
        raise SourceError(f"source {config.name!r}: cannot load {config.path!r}: {err}") from err
    if isinstance(dataset, datasets.DatasetDict):
        if config.split not in dataset:
            raise SourceError(f"source {config.name!r}: no split {config.split!r} (has {', '.join(dataset)})")
        dataset = dataset[config.split]
    if config.text_field not in dataset.column_names:
        raise SourceError(
            f"source {config.name!r}: no text field {config.text_field!r} (columns: {', '.join(dataset.column_names)})"
        )
    return dataset


def generated_records(config: SourceConfig, seed: int) -> list[dict]:
    """The generated documents of a bios, multihop or mano source, as rows."""
    if config.kind == "bios":
        pages = synthetic.profile_pages(config.count, seed, config.people_per_page)
        clean = [(f"bios-{i:07d}", text) for i, text in enumerate(pages)]
        if config.noise is None:
            records = [{"id": i, "text": t, "meta": {}} for i, t in clean]
        else:
            records = plant_defects(clean, config.noise, seed, [qa.text for qa in eval_questions(seed)])
    elif config.kind == "multihop":
        world = synthetic.multihop_world(seed)
        train, _ = synthetic.multihop_split(world, train_count=config.count * config.items_per_doc, seed=seed)
        facts = synthetic.multihop_facts(world)
        per_person = len(world.relations)
        records = [
            {"id": f"facts-{i // per_person:05d}", "text": " ".join(facts[i : i + per_person]), "meta": {}}
            for i in range(0, len(facts), per_person)
        ]
        n = config.items_per_doc
        records += [
            {"id": f"qa-{k:06d}", "text": "\n".join(qa.text for qa in train[k * n : (k + 1) * n]), "meta": {}}
            for k in range(config.count)
        ]
    else:
        problems = synthetic.mano_problems(config.count * config.items_per_doc, seed, config.max_operators)
        n = config.items_per_doc
        records = [
            {"id": f"mano-{k:06d}", "text": "\n".join(p.text for p in problems[k * n : (k + 1) * n]), "meta": {}}
            for k in range(config.count)
        ]
    return [_row(config.name, r["id"], r["text"], r["meta"]) for r in records]


def eval_questions(seed: int) -> list[synthetic.QA]:
    """The held-out 3-hop test questions of the generated multi-hop world: the built-in evaluation set."""
    _, test = synthetic.multihop_split(synthetic.multihop_world(seed), train_count=0, seed=seed)
    return test


def _root(config: SourceConfig) -> Path:
    """The folder that file ids are relative to: the source's folder, or a single file's parent."""
    path = Path(config.path)
    return (path if path.is_dir() else path.parent).resolve()


def _generated_blocks(config: SourceConfig, seed: int) -> list[pd.DataFrame]:
    frame = pd.DataFrame(generated_records(config, seed), columns=list(COLUMNS))
    # Several blocks, so the stages after this one run in parallel.
    return [frame.iloc[i : i + BLOCK_ROWS] for i in range(0, len(frame), BLOCK_ROWS)] or [frame]


def _hf_blocks(config: SourceConfig) -> list:
    """The dataset's Arrow table in BLOCK_ROWS slices, each row numbered (the key's last part)."""
    import pyarrow as pa

    table = load_hf(config).flatten_indices().data.table
    table = table.append_column(ROW, pa.array(range(table.num_rows), type=pa.int64()))
    return [table.slice(i, BLOCK_ROWS) for i in range(0, table.num_rows, BLOCK_ROWS)] or [table]


def read_source(config: SourceConfig, seed: int = 0):
    """A Ray Dataset of the source's rows in our schema (see the module docstring)."""
    import ray.data

    if config.kind in GENERATED:
        return ray.data.from_arrow([_arrow(block) for block in _generated_blocks(config, seed)])
    root = _root(config) if config.kind in ("jsonl", "text", "parquet") else None
    if config.kind == "jsonl":
        paths = [str(f.resolve()) for f in _files(config, JSONL_SUFFIXES)]
        return ray.data.read_binary_files(paths, include_paths=True).flat_map(_jsonl_rows, fn_args=(config, str(root)))
    if config.kind == "text":

        def parse_text(item: dict) -> dict:
            return parse_text_file(item["bytes"], config.name, str(Path(item["path"]).relative_to(root)))

        paths = [str(f.resolve()) for f in _files(config, ())]
        return ray.data.read_binary_files(paths, include_paths=True).map(parse_text)
    if config.kind == "parquet":
        files = check_parquet(config)
        # One task per file, so each row's number in its file (the key) is known.
        paths = ray.data.from_items([str(f.resolve()) for f in files], override_num_blocks=len(files))
        return paths.map_batches(
            _parquet_file_rows, fn_args=(config, str(root)), batch_size=None, batch_format="pandas"
        )
    # from_arrow, not from_huggingface: the latter re-resolves local datasets by name (notes §3).
    return ray.data.from_arrow(_hf_blocks(config)).map_batches(
        _table_rows_arrow, fn_args=(config,), batch_format="pandas"
    )


# A read without Ray: a picklable function and its arguments, returning a frame of rows or yielding frames.
ReadTask = tuple[Callable[..., "pd.DataFrame | Iterator[pd.DataFrame]"], tuple]


def read_tasks(config: SourceConfig, seed: int = 0) -> list[ReadTask]:
    """The source's rows as pandas frames without Ray (the local executor): one task per file (jsonl, parquet), per
    BLOCK_ROWS text files, or per block of generated or `hf` rows, which, run in order, give the rows and the order
    `read_source` gives. The tasks read their files themselves, so a process pool reads in parallel."""
    if config.kind in GENERATED:
        return [(_frame, (block,)) for block in _generated_blocks(config, seed)]
    if config.kind == "hf":
        return [(_hf_block_frame, (block, config)) for block in _hf_blocks(config)]
    root = str(_root(config))
    if config.kind == "jsonl":
        return [(_jsonl_file_frame, (str(f.resolve()), config, root)) for f in _files(config, JSONL_SUFFIXES)]
    if config.kind == "parquet":
        return [(_parquet_file_frames, (str(f.resolve()), config, root)) for f in check_parquet(config)]
    paths = [str(f.resolve()) for f in _files(config, ())]
    return [
        (_text_files_frame, (paths[i : i + BLOCK_ROWS], config.name, root)) for i in range(0, len(paths), BLOCK_ROWS)
    ]


def _frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame


def _jsonl_file_frame(path: str, config: SourceConfig, root: str) -> pd.DataFrame:
    rows = _jsonl_rows({"path": path, "bytes": Path(path).read_bytes()}, config, root)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _text_files_frame(paths: list[str], source: str, root: str) -> pd.DataFrame:
    rows = [parse_text_file(Path(p).read_bytes(), source, str(Path(p).relative_to(root))) for p in paths]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _hf_block_frame(block, config: SourceConfig) -> pd.DataFrame:
    return _table_rows(block.to_pandas(), config)
