"""Data for the Seq2Seq model: the embedded date-normalization task, TSV pairs, character vocabularies, batches.

The embedded task needs no download: human-written dates in English, Russian, German, French and Spanish
("25 июня 2009 г.", "Thursday, June 25, 2009", "25/06/2009", "6/25/09", ...) are rendered from Babel's CLDR
locale data and paired with their ISO form ("2009-06-25").

    splits = make_date_splits(seed=0)                     # DateSplits(train, valid, test) of (source, target)
    src_vocab, tgt_vocab = build_vocabs(splits.train)
    for src, src_lengths, tgt_in, tgt_out in batches(splits.train, src_vocab, tgt_vocab, 64, generator=0):
        ...                                               # [B, S], [B], [B, T], [B, T] int64, PAD = 0
    pairs = read_tsv("my_data.tsv")                       # any `source<TAB>target` file, same pair lists

Conventions of the date task (so that every source string has exactly one correct target):
- Numeric day/month order follows the locale: month first for `en` (US English, Babel's "en"), day first for
  ru, de, fr and es. A separator used with both orders ("/" and "-": en "6/25/09" vs es "25/6/09") would make a
  string like "3/4/09" mean two dates, so such a form is only generated when the reading is the same either way
  (day > 12, or day == month); another form is drawn otherwise. "." is day-first everywhere and always allowed.
- A two-digit year ("yy") is always last and means 1950..2049 (a fixed pivot, like POSIX strptime's but not
  moving with the clock); forms with a two-digit year are only generated for dates in that window.
- Year-first numeric forms ("2009/06/25", "2009.06.25") always have a four-digit year and are Y-M-D.
- CLDR's no-break spaces (U+00A0, U+202F) are written as plain spaces, as users type them.
- Splits are by the date itself: a date's split depends only on (seed, ISO date), so no test date appears in
  training in any format, whatever the sizes or the date range asked for.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import torch

from attn_fast.examples.errors import UserError

# Babel is imported inside the functions that use it: reading TSV data, vocabularies and batches work without it.

__all__ = [
    "LANGUAGES", "Pair", "DateExample", "DateSplits", "date_split", "date_patterns", "render_date",
    "sample_date_examples", "make_date_examples", "make_date_splits",
    "CharVocab", "build_vocabs", "Batch", "batches", "read_tsv", "source_problem", "escape_tsv_field",
]

Pair = tuple[str, str]  # (source, target)

LANGUAGES = ("en", "ru", "de", "fr", "es")
DEFAULT_START = datetime.date(1900, 1, 1)
DEFAULT_END = datetime.date(2099, 12, 31)
# Share of all dates held out for validation and for test. Fixed (not derived from the split sizes) so that a
# date's split never changes when someone asks for other sizes: a larger test set must not eat training dates.
VALID_FRACTION = 0.05
TEST_FRACTION = 0.05
TWO_DIGIT_YEAR_WINDOW = (1950, 2049)

# Babel's own formats of each locale, plus hand-picked CLDR patterns people write. Numeric day/month patterns
# follow the locale's order (see the module docstring).
_LOCALE_FORMATS = ("short", "medium", "long", "full")
_EXTRA_PATTERNS = {
    "en": ("d MMMM y", "d MMM y", "MMM d, y", "MMMM d y", "EEEE d MMMM y", "EEE, MMM d, y",
           "M/d/y", "MM/dd/y", "MM-dd-y"),
    "ru": ("d MMMM y", "d MMM y", "EEEE d MMMM y", "EEE, d MMM y", "dd.MM.yy", "d.M.y", "dd/MM/y"),
    "de": ("d MMMM y", "d. MMM y", "EEEE d MMMM y", "EEE, d. MMM y", "d.M.y", "d.M.yy", "dd/MM/y"),
    "fr": ("d MMMM y", "d MMM y", "EEEE d MMMM y", "EEE d MMM y", "d/M/y", "d/M/yy", "dd.MM.y", "dd-MM-y"),
    "es": ("d MMMM y", "d MMM y", "EEEE d MMMM y", "EEE, d MMM y", "dd/MM/y", "d-M-y", "dd.MM.yy"),
}
_YEAR_FIRST_PATTERNS = ("y-MM-dd", "y/MM/dd", "y.MM.dd")  # language-neutral, offered in every language

_QUOTED = re.compile(r"'[^']*'")
_FIELD = re.compile(r"(d+|M+|L+|y+|E+)")


# ----------------------------------------------------------------------------------------------------------------
# The date task
# ----------------------------------------------------------------------------------------------------------------

class DateExample(NamedTuple):
    """One generated example: `source` written with CLDR `pattern` in `language` (before noise), `target` ISO."""
    source: str
    target: str
    language: str
    pattern: str


class DateSplits(NamedTuple):
    """train / valid / test lists: of `(source, target)` pairs from `make_date_splits`, of `DateExample` from
    `make_date_examples`."""
    train: list
    valid: list
    test: list


@functools.cache
def date_patterns(language: str) -> tuple[str, ...]:
    """All CLDR patterns the generator may use for `language`: Babel's short/medium/long/full formats of the
    locale, the extra patterns, and the year-first numeric ones (duplicates removed, order kept)."""
    from babel.dates import get_date_format

    if language not in _EXTRA_PATTERNS:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    own = tuple(get_date_format(f, locale=language).pattern for f in _LOCALE_FORMATS)
    return tuple(dict.fromkeys(own + _EXTRA_PATTERNS[language] + _YEAR_FIRST_PATTERNS))


def _numeric_layout(pattern: str) -> tuple[str, frozenset[str]] | None:
    """("DM" or "MD", separator characters) for a pattern with a numeric day and a numeric month, else None."""
    fields = [f for f in _FIELD.findall(_QUOTED.sub("", pattern)) if f[0] in "dMy"]
    letters = [f[0] for f in fields]
    month = next((f for f in fields if f[0] == "M"), None)
    if month is None or len(month) > 2 or "d" not in letters or letters[0] == "y":
        return None  # month spelled out, or year first (always Y-M-D): no day/month confusion possible
    order = "DM" if letters.index("d") < letters.index("M") else "MD"
    return order, frozenset(_FIELD.sub("", _QUOTED.sub("", pattern)))


@functools.cache
def _order_clashing_separators() -> frozenset[str]:
    """Separators used by a day-first pattern in one language and a month-first one in another (over all
    languages, so that a subset of languages follows the same conventions as the full task)."""
    seps = {"DM": set(), "MD": set()}
    for language in LANGUAGES:
        for pattern in date_patterns(language):
            layout = _numeric_layout(pattern)
            if layout:
                seps[layout[0]] |= layout[1]
    return frozenset(seps["DM"] & seps["MD"])


def _has_two_digit_year(pattern: str) -> bool:
    return any(f == "yy" for f in _FIELD.findall(_QUOTED.sub("", pattern)))


def _date_traits(day: datetime.date) -> tuple[bool, bool]:
    """(year writable with two digits, day/month order irrelevant): all that decides which patterns may be used."""
    low, high = TWO_DIGIT_YEAR_WINDOW
    return low <= day.year <= high, day.day > 12 or day.day == day.month


@functools.cache
def _usable_patterns(language: str, two_digit_year_ok: bool, order_irrelevant: bool) -> tuple[str, ...]:
    """The patterns of `language` that write a date with these traits unambiguously. Cached: sampling calls it
    per example, and the pattern analysis is regex work."""
    usable = []
    for pattern in date_patterns(language):
        if _has_two_digit_year(pattern) and not two_digit_year_ok:
            continue
        layout = _numeric_layout(pattern)
        if layout and layout[1] & _order_clashing_separators() and not order_irrelevant:
            continue
        usable.append(pattern)
    return tuple(usable)


@functools.cache
def _locale(language: str):
    from babel import Locale

    return Locale.parse(language)  # parsed once: format_date is ~2x faster with a Locale than with a string


def render_date(day: datetime.date, language: str, pattern: str) -> str:
    """`day` written with CLDR `pattern` in `language`, no-break spaces made plain. No ambiguity check."""
    from babel.dates import format_date

    return format_date(day, pattern, locale=_locale(language)).replace("\u202f", " ").replace("\u00a0", " ")


def date_split(day: datetime.date, seed: int) -> str:
    """"train", "valid" or "test": the split `day` belongs to for `seed`, from a hash of (seed, ISO date) alone."""
    digest = hashlib.blake2b(f"{seed}|{day.isoformat()}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64  # uniform in [0, 1)
    return "test" if u < TEST_FRACTION else "valid" if u < TEST_FRACTION + VALID_FRACTION else "train"


def _add_noise(text: str, language: str, rng: random.Random) -> str:
    """What users do to dates: drop or add Russian "г." (year), change case, type an extra space."""
    if language == "ru" and rng.random() < 0.3:
        if text.endswith(" г."):
            text = text[:-3]
        elif re.search(r"\d{4}$", text):
            text += " г."
    r = rng.random()
    if r < 0.10:
        text = text.lower()
    elif r < 0.15:
        text = text.upper()
    spaces = [i for i, c in enumerate(text) if c == " "]
    if spaces and rng.random() < 0.10:
        i = rng.choice(spaces)
        text = text[:i] + " " + text[i:]
    return text


def sample_date_examples(dates: Sequence[datetime.date], count: int, seed: int | str,
                         languages: Sequence[str] = LANGUAGES, noise: bool = True) -> list[DateExample]:
    """`count` examples, each: a date drawn uniformly from `dates`, a language uniformly from `languages`, a
    pattern uniformly from those of the language that write this date unambiguously, then noise if asked.
    Deterministic in `seed` (a Python `random.Random` seed)."""
    if count > 0 and not dates:
        raise ValueError("no dates to sample from (date range too small for this split?)")
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        day = rng.choice(dates)
        language = rng.choice(languages)
        pattern = rng.choice(_usable_patterns(language, *_date_traits(day)))
        source = render_date(day, language, pattern)
        if noise:
            source = _add_noise(source, language, rng)
        examples.append(DateExample(source, day.isoformat(), language, pattern))
    return examples


def make_date_examples(seed: int = 0, sizes: tuple[int, int, int] = (20000, 1000, 1000),
                       languages: Sequence[str] = LANGUAGES, *, start: datetime.date = DEFAULT_START,
                       end: datetime.date = DEFAULT_END, noise: bool = True) -> DateSplits:
    """DateSplits of `DateExample` lists of lengths `sizes` (train, valid, test), dates in [start, end].

    Each date of the range belongs to one split (`date_split`: ~90% train, 5% valid, 5% test); each split samples
    its dates uniformly with replacement from its own dates. Same arguments -> identical result."""
    for language in languages:
        date_patterns(language)  # validates the name
    if len(sizes) != 3 or min(sizes) < 0:
        raise ValueError(f"sizes must be three non-negative counts (train, valid, test), got {sizes}")
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    pools = {"train": [], "valid": [], "test": []}
    for offset in range((end - start).days + 1):
        day = start + datetime.timedelta(days=offset)
        pools[date_split(day, seed)].append(day)
    # One RNG per split, seeded from (seed, split name): a split's content does not depend on the other sizes.
    return DateSplits(*(sample_date_examples(pools[name], size, f"{seed}/{name}", languages, noise)
                        for name, size in zip(DateSplits._fields, sizes)))


def make_date_splits(seed: int = 0, sizes: tuple[int, int, int] = (20000, 1000, 1000),
                     languages: Sequence[str] = LANGUAGES, *, start: datetime.date = DEFAULT_START,
                     end: datetime.date = DEFAULT_END, noise: bool = True) -> DateSplits:
    """The date task as DateSplits(train, valid, test) of `(source, target)` pairs, e.g.
    ("25 июня 2009 г.", "2009-06-25"). Same examples as `make_date_examples` with the same arguments."""
    examples = make_date_examples(seed, sizes, languages, start=start, end=end, noise=noise)
    return DateSplits(*([(e.source, e.target) for e in split] for split in examples))


# ----------------------------------------------------------------------------------------------------------------
# Vocabularies
# ----------------------------------------------------------------------------------------------------------------

class CharVocab:
    """Characters <-> ids. Ids 0..3 are PAD, BOS, EOS, UNK; characters follow, in the order given."""
    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    UNK_CHAR = "\ufffd"  # what `decode` writes for UNK

    def __init__(self, chars: Iterable[str]):
        self.chars = list(dict.fromkeys(chars))
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("CharVocab holds single characters")
        self._ids = {c: i for i, c in enumerate(self.chars, start=len(self.SPECIALS))}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> CharVocab:
        """Vocabulary of the characters seen at least `min_count` times in `texts`, sorted (deterministic)."""
        counts = Counter(c for text in texts for c in text)
        return cls(sorted(c for c, n in counts.items() if n >= min_count))

    def __len__(self) -> int:
        return len(self.SPECIALS) + len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, CharVocab) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharVocab({len(self)} ids: {''.join(self.chars)!r})"

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`'s characters (UNK for unknown ones), with BOS before / EOS after if asked."""
        ids = [self._ids.get(c, self.UNK) for c in text]
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of `ids` (list or 1-D tensor): stops at the first EOS, skips PAD and BOS, UNK -> U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == self.EOS:
                break
            if i >= len(self.SPECIALS):
                out.append(self.chars[i - len(self.SPECIALS)])
            elif i == self.UNK:
                out.append(self.UNK_CHAR)
        return "".join(out)

    def to_dict(self) -> dict:
        """JSON-able form (e.g. to carry inside a checkpoint); `from_dict` inverts it."""
        return {"specials": list(self.SPECIALS), "chars": list(self.chars)}

    @classmethod
    def from_dict(cls, data: dict) -> CharVocab:
        if list(data.get("specials", [])) != list(cls.SPECIALS):
            raise ValueError(f"vocabulary specials {data.get('specials')} != {list(cls.SPECIALS)}")
        return cls(data["chars"])

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharVocab:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def build_vocabs(pairs: Sequence[Pair], min_count: int = 1) -> tuple[CharVocab, CharVocab]:
    """(source vocabulary, target vocabulary) of the training pairs."""
    return (CharVocab.build((s for s, _ in pairs), min_count), CharVocab.build((t for _, t in pairs), min_count))


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------

class Batch(NamedTuple):
    """Padded with PAD = 0. S = longest source, T = longest target + 1 in the batch."""
    src: torch.Tensor          # [B, S] int64
    src_lengths: torch.Tensor  # [B] int64, >= 1 unless a source is empty
    tgt_in: torch.Tensor       # [B, T] int64: BOS, target          (decoder input, teacher forcing)
    tgt_out: torch.Tensor      # [B, T] int64: target, EOS          (what to predict; PAD = ignore_index)


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(map(len, rows), default=0)
    return torch.tensor([row + [CharVocab.PAD] * (width - len(row)) for row in rows], dtype=torch.int64)


def batches(pairs: Sequence[Pair], src_vocab: CharVocab, tgt_vocab: CharVocab, batch_size: int, *,
            shuffle: bool = True, generator: torch.Generator | int | None = None, bucket_batches: int = 50,
            sort_by_length: bool = True, drop_last: bool = False) -> Iterator[Batch]:
    """Batches of `pairs`, grouped by source length.

    shuffle: shuffle the examples, cut them into buckets of `bucket_batches * batch_size`, sort each bucket by
    source length and cut it into batches (so a batch holds sources of similar length while every epoch mixes
    differently), then shuffle the order of the batches (else each bucket would run short -> long). Randomness
    comes from `generator` (a torch.Generator, or an int seed; None: torch's global RNG).
    shuffle=False: buckets in input order, no batch shuffling; with sort_by_length=False as well, batches hold
    the pairs in input order (for evaluation against references).
    Within a batch, sorted sources come longest first (what `pack_padded_sequence(enforce_sorted=True)` needs).
    At most one batch (the last one cut) is smaller than `batch_size`; drop_last drops it.
    """
    if batch_size < 1 or bucket_batches < 1:
        raise ValueError(f"batch_size and bucket_batches must be >= 1, got {batch_size}, {bucket_batches}")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    n = len(pairs)
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    src = [src_vocab.encode(s) for s, _ in pairs]
    bucket = bucket_batches * batch_size  # a multiple of batch_size: only the very last batch can be short
    groups = []
    for b0 in range(0, n, bucket):
        members = order[b0:b0 + bucket]
        if sort_by_length:
            members.sort(key=lambda i: -len(src[i]))  # stable: ties keep the shuffled order
        groups += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    if drop_last and groups and len(groups[-1]) < batch_size:
        groups.pop()
    if shuffle:
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    for members in groups:
        tgt = [tgt_vocab.encode(pairs[i][1]) for i in members]
        yield Batch(src=_pad([src[i] for i in members]),
                    src_lengths=torch.tensor([len(src[i]) for i in members], dtype=torch.int64),
                    tgt_in=_pad([[CharVocab.BOS] + t for t in tgt]),
                    tgt_out=_pad([t + [CharVocab.EOS] for t in tgt]))


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------

def read_tsv(path: str | os.PathLike, *, max_source_length: int | None = None) -> list[Pair]:
    """`(source, target)` pairs of a UTF-8 file of `source<TAB>target` lines (a byte-order mark at its start, as
    some editors write, is not part of the first source). Blank lines are skipped. A line that is not valid UTF-8,
    has not exactly one tab or an empty side, or (with `max_source_length`) a source of more characters raises
    UserError naming the file and line number; a missing or unreadable file raises OSError."""
    pairs = []
    with open(path, "rb") as f:  # bytes: a decoding error then names its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"{path}:{lineno}: not valid UTF-8 text (byte {error.start + 1} of the line: "
                                f"{raw[error.start:error.start + 1]!r}); save the file as UTF-8") from None
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0] or not fields[1]:
                raise UserError(f"{path}:{lineno}: expected 'source<TAB>target' with both sides non-empty, "
                                f"got {len(fields)} tab-separated field(s): {line[:80]!r}")
            if max_source_length is not None and len(fields[0]) > max_source_length:
                raise UserError(f"{path}:{lineno}: the source has {len(fields[0])} characters, more than the "
                                f"maximum source length, {max_source_length} (--max-source-length)")
            pairs.append((fields[0], fields[1]))
    return pairs


def source_problem(source: str) -> str | None:
    """Why `source` cannot be translated, in words for the user, or None when it can: it is empty, or holds text
    that was not valid UTF-8 (Python keeps such command-line bytes as lone surrogates, U+DC80..U+DCFF, which no
    vocabulary holds and no file or figure can show)."""
    if not source:
        return "the source is empty"
    if any("\ud800" <= character <= "\udfff" for character in source):
        return "the source is not valid UTF-8 text"
    return None


_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def escape_tsv_field(text: str) -> str:
    """`text` safe as one field of a TSV line: backslash, tab, newline and carriage return written as the two
    characters \\\\, \\t, \\n, \\r (so that a field never splits its line, and the escaping can be undone)."""
    return text.translate(_TSV_ESCAPES)
