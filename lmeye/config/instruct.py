"""`instruct:` — LMEyeMID-style instruction data (owned by the instruct stage).

The stage reads a list of *sources*, each one of four kinds (the ``kind`` key picks it):

* ``captions``: caption rows of a ``pairs`` table (or a json/jsonl file of ``{image, caption}``)
  turned into tasks by the templates file: short caption, detailed description, caption-grounded
  questions, each with several phrasings;
* ``vqa``: question/answer sets in the common VQA layout ``[{image, question, answer}]``, or
  VQAv2 as released: the questions file (``{"questions": [{image_id, question, question_id}]}``)
  as ``path`` and its annotations file as ``answers`` (joined by ``question_id``);
* ``llava``: LLaVA conversations ``[{id, image, conversations: [{from, value}, ...]}]``; a record
  without ``image`` is text-only (kept with a null uid and task ``text_only_task``, unless
  ``text_only: false``), and a question/answer pair with an empty side is left out alone;
* ``lmeyemid``: LMEyeMID records ``{question, answer, image_path, chunk_belong}``.

Every row keeps its record's own id (``id_field``) or its position in its file as ``source_id``.

Every source has a ``weight`` (the fraction of its records kept, chosen by a seeded hash, so the
choice is deterministic) and an optional ``cap`` (at most that many records enter the table).
Image references in files map to uids by the source's ``image_key`` rule:

* ``basename``: the reference's file name equals the file name of a ``pairs`` URL, exactly
  (the default, LMEyeMID's included: OCR-VQA's ISBN names such as ``000100039X.jpg`` and
  ``0618127453.jpg`` are not numbers);
* ``path``: its last ``path_components`` path components equal those of a ``pairs`` URL;
* ``coco_id``: the COCO image id (``COCO_train2014_000000123456.jpg``, ``000000123456.jpg`` or
  the number itself) equals the id parsed from a ``pairs`` URL's file name. Only COCO's own
  names are ids: any other reference (Flickr30k's ``1000092795.jpg``, GQA's ``n161313.jpg``,
  TextCaps' ``0a0bc91825468c45.jpg``) is a malformed record naming it, so a mixed source must
  use ``path`` or ``basename``;
* ``url``: ``uid_for(url_prefix + reference)``; no pairs table needed;
* ``uid``: the reference is the uid itself.

A .json file is a list of records, or an object holding the list under ``annotations`` or
``questions`` (COCO's ``captions_train2017.json``, VQAv2's files, as released). A source whose
records are mostly malformed (more than ``max_malformed_fraction``) fails, naming the first one.

Source paths may name ``{data.root}`` and ``{demo.corpus_dir}``; they are filled in from the
rest of the config when the stage runs.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from lmeye.config.base import Section

ImageKey = Literal["basename", "path", "coco_id", "url", "uid"]

CAPTION_TASKS = ("short_caption", "detailed_description", "grounded_qa")


class _Source(Section):
    name: Optional[str] = Field(None, description="unique name, the `source` column; default: the kind")
    enabled: bool = True
    weight: float = Field(1.0, gt=0, le=1, description="fraction of the records kept (seeded hash, deterministic)")
    cap: Optional[int] = Field(
        None, ge=0, description="at most this many records enter the table, in input order (the rest: over_cap)"
    )
    task: Optional[str] = Field(None, description="the `task` column; default per kind")


class _FileSource(_Source):
    path: Optional[str] = Field(None, description="a .json (list) or .jsonl file (.gz ok), a folder of them, or a glob")
    image_key: ImageKey = Field("basename", description="how an image reference maps to a uid (see module doc)")
    path_components: int = Field(2, ge=1, description="image_key: path: how many trailing path components to match")
    url_prefix: str = Field("", description="image_key: url: prepended to the reference before hashing")
    id_field: Optional[str] = Field("id", description="the record's own id, kept as source_id (else its file:position)")


class CaptionsSource(_FileSource):
    kind: Literal["captions"]
    table: Optional[str] = Field(None, description="pairs table with the captions; default instruct.pairs (ignored when path is set)")
    image_field: str = "image"
    caption_field: str = "caption"
    tasks: dict[str, float] = Field(
        default_factory=lambda: {t: 1.0 for t in CAPTION_TASKS},
        description="caption tasks (names in the templates file) and their relative weights; one task per caption",
    )

    @model_validator(mode="after")
    def _check_tasks(self) -> "CaptionsSource":
        if not self.tasks or any(w < 0 for w in self.tasks.values()) or sum(self.tasks.values()) <= 0:
            raise ValueError("tasks: need at least one task with a positive weight")
        return self


ANSWER_FORMATS = ("plain", "short", "yes_no", "multiple_choice", "multiple_choice_text")


class _QASource(_FileSource):
    """A source of one question and one answer per record, which can be asked in benchmark formats."""

    formats: dict[str, float] = Field(
        default_factory=lambda: {"plain": 1.0},
        description="answer formats and their relative weights, one per record (pipelines/instruct/formats.py): "
                    "plain, short, yes_no (balanced negatives), multiple_choice (distractors of the same question type; the reply is "
                    "the letter), multiple_choice_text (the same prompt, the reply the option's text)",
    )
    type_words: int = Field(3, ge=1, description="a question's type is its first this many words (the distractors' pool)")
    distractors: int = Field(3, ge=1, le=25, description="multiple_choice: wrong options per question (fewer when the type has fewer answers)")

    @model_validator(mode="after")
    def _check_formats(self) -> "_QASource":
        unknown = [f for f in self.formats if f not in ANSWER_FORMATS]
        if unknown:
            raise ValueError(f"formats: unknown format(s) {', '.join(unknown)}; expected some of {', '.join(ANSWER_FORMATS)}")
        if not self.formats or any(w < 0 for w in self.formats.values()) or sum(self.formats.values()) <= 0:
            raise ValueError("formats: need at least one format with a positive weight")
        return self


class VQASource(_QASource):
    kind: Literal["vqa"]
    image_field: str = "image"
    question_field: str = "question"
    answer_field: str = Field("answer", description="a string, or a list of answers (the most frequent is used)")
    answers: Optional[str] = Field(
        None, description="VQAv2 as released: the annotations file beside the questions file `path`; each question's "
                          "answer is its annotation's multiple_choice_answer, joined by question_id")


class LlavaSource(_FileSource):
    kind: Literal["llava"]
    image_field: str = "image"
    conversations_field: str = "conversations"
    text_only: bool = Field(True, description="keep records without an image (null uid); false: reject them as no_image")
    text_only_task: str = Field("text_conversation", description="the `task` column of a text-only record")


class LMEyeMIDSource(_QASource):
    kind: Literal["lmeyemid"]
    image_key: ImageKey = Field("basename", description="exact file names (coco_id: COCO-named files only)")
    image_field: str = "image_path"
    question_field: str = "question"
    answer_field: str = "answer"


Source = Annotated[Union[CaptionsSource, VQASource, LlavaSource, LMEyeMIDSource], Field(discriminator="kind")]

DEFAULT_TASK = {"vqa": "vqa", "llava": "conversation", "lmeyemid": "instruction"}


class InstructConfig(Section):
    pairs: Optional[str] = Field(None, description="pairs table (maps image references to uids); default download.output")
    features: Optional[str] = Field(None, description="features table (rows whose image has none are left out); default extract.output")
    output: Optional[str] = Field(None, description="instructions table; default {data.root}/instructions")
    sources: list[Source] = Field(
        default_factory=lambda: [CaptionsSource(kind="captions")],
        description="what to build from; default: the captions of the pairs table",
    )
    templates: Optional[str] = Field(None, description="caption templates (YAML); default the packaged lmeye/templates/captions.yaml")
    curation: Optional[str] = Field(
        None, description="curation table (lmeye curate): rows whose image it does not keep are left out (curated_out); "
        "null: no curation")
    require_features: bool = Field(True, description="leave out rows whose image has no features (false: no check, said in the summary)")
    seed: int = Field(0, description="template phrasing, weight sampling and shuffling")
    split_seed: int = Field(0, description="salt of the train/validation split by uid (separate, so reshuffling never moves images)")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="fraction of images (uids) in the validation split")
    dedupe: bool = Field(True, description="drop exact duplicates: same uid and same conversation (first source wins)")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="a malformed JSON record or line: error naming file and record, or skip and count it"
    )
    max_malformed_fraction: float = Field(
        0.5, ge=0, le=1, description="on_bad_record: skip: a source with more malformed records than this fraction "
                                     "fails (its fields or image_key do not fit the data) instead of yielding no rows")
    partition_mb: float = Field(64, gt=0, description="target size of a partition in MiB (the unit held in memory; more input, more partitions)")
    chunk_rows: int = Field(50_000, gt=0, description="rows built in Python before they are spilled")
    tmp_dir: Optional[str] = Field(None, description="local folder for spill files, on the node that runs the spill task; default its system temp folder")
    export_hf: Optional[str] = Field(None, description="also write a HF DatasetDict (save_to_disk) here")
    allow_incomplete: bool = Field(
        False, description="read the finished shards of an unfinished pairs/features table (said in the summary and manifest)"
    )
    debug_delay_s: float = Field(0.0, ge=0, description="testing: sleep after each partition written (a window to kill the stage)")

    @model_validator(mode="after")
    def _unique_names(self) -> "InstructConfig":
        seen: set[str] = set()
        for i, src in enumerate(self.sources):
            name = src.name or src.kind
            if name in seen:
                raise ValueError(f"sources.{i}: duplicate source name '{name}'; give each source a distinct name")
            seen.add(name)
            if src.kind != "captions" and src.path is None:
                raise ValueError(f"sources.{i} ({name}): path is required for a {src.kind} source")
        return self
