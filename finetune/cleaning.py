"""Clean-ups of metadata captions and tags (tools_and_preprocessing.md §3.6), used by
clean_captions_and_tags.py.

Tags (a ", "-separated string, as written by DeepDanbooru or the WD14 tagger):

1. ``_`` becomes a space, except in the emoticon ``^_^``.
2. DeepDanbooru's rating tags are dropped: everything from the first ", rating" on.
3. With several people in the picture ("girls" or "boys" anywhere), per-person attributes are
   dropped when they disagree: every family below that matches more than once loses all its tags (hair
   length, hair cut, eye colour, sleeves, hairstyle), then all "<word> hair" tags if more than one is
   left (one remaining hair-length tag is kept).
4. A one-word tag is dropped when a longer tag ends with it ("shirt" beside "white shirt"); the same
   for "hair ornament".
5. Empty tags are removed.

Captions: fixed substring replacements that unify the words automatic captioners use for a person
("anime woman" → "girl", "people" → "girls", ...). They are plain substrings, not words (so "ladybug"
becomes "girlbug", as in the reference).

Both functions are idempotent: cleaning a cleaned text changes nothing. (The reference applied the
caption list once, so "anime people" needed two runs to become "girls"; here the list is repeated until
nothing changes, and empty tags are collapsed completely.)
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

_WORD = r"[\w\-]+"
HAIR_LENGTH = re.compile(r", (long|short|medium) hair, ")
HAIR_CUT = re.compile(r", (bob|hime) cut, ")
ANY_HAIR = re.compile(rf", ({_WORD}) hair, ")
SINGLE_WORD_TAG = re.compile(rf", ({_WORD}|hair ornament), ")

# Families of per-person tags: with several people, a family matching more than once is dropped.
MULTI_PERSON_FAMILIES = (
    HAIR_LENGTH,
    HAIR_CUT,
    re.compile(rf", {_WORD} eyes, "),
    re.compile(rf", ({_WORD} sleeves|sleeveless), "),
    re.compile(rf", (ponytail|braid|ahoge|twintails|{_WORD} bun|single hair bun|single side bun|two side up"
               rf"|two tails|{_WORD} braid|sidelocks), "),
)

_EMOTICON = "^_^"
_EMOTICON_SHIELD = "^\x00^"
_HAIR_LENGTH_SHIELD = ", \x00, "

# (search, replacement), applied in this order, each until it no longer matches.
CAPTION_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("anime anime", "anime"),
    ("young ", ""),
    ("anime girl", "girl"),
    ("cartoon female", "girl"),
    ("cartoon lady", "girl"),
    ("cartoon character", "girl"),
    ("cartoon woman", "girl"),
    ("cartoon women", "girls"),
    ("cartoon girl", "girl"),
    ("anime female", "girl"),
    ("anime lady", "girl"),
    ("anime character", "girl"),
    ("anime woman", "girl"),
    ("anime women", "girls"),
    ("lady", "girl"),
    ("female", "girl"),
    ("woman", "girl"),
    ("women", "girls"),
    ("people", "girls"),
    ("person", "girl"),
    ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"),
    ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"),
    ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),
)


def _drop_disagreeing_person_tags(tags: str) -> str:
    """Step 3 on the ", t1, , t2, " form: drop per-person families that match more than once."""
    for family in MULTI_PERSON_FAMILIES:
        if len(family.findall(tags)) > 1:
            tags = family.sub("", tags)
    kept_length = HAIR_LENGTH.search(tags)  # at most one is left: shield it from the "<word> hair" rule
    if kept_length:
        tags = HAIR_LENGTH.sub(_HAIR_LENGTH_SHIELD, tags)
    if len(ANY_HAIR.findall(tags)) > 1:
        tags = ANY_HAIR.sub("", tags)
    if kept_length:
        tags = tags.replace(_HAIR_LENGTH_SHIELD, kept_length.group())
    return tags


def _drop_redundant_words(tags: str) -> str:
    """Step 4: drop a one-word tag ``w`` when some tag ``<words> w`` exists."""
    for word in SINGLE_WORD_TAG.findall(tags):
        if re.search(rf", (\w+ )+{re.escape(word)}, ", tags):
            tags = tags.replace(f", {word}, ", "")
    return tags


def clean_tags(tags: str, image_key: str = "") -> str:
    """The cleaned tag string (see the module docstring); ``image_key`` only labels log messages."""
    tags = tags.replace(_EMOTICON, _EMOTICON_SHIELD).replace("_", " ").replace(_EMOTICON_SHIELD, _EMOTICON)
    parts = tags.split(", rating")
    if len(parts) > 2:
        logger.warning("multiple ratings in the tags of %s: %s", image_key, tags)
    tags = parts[0]

    tags = ", " + tags.replace(", ", ", , ") + ", "  # every tag enclosed in its own ", " ... ", "
    if "girls" in tags or "boys" in tags:
        tags = _drop_disagreeing_person_tags(tags)
    tags = _drop_redundant_words(tags)

    while ", , " in tags:
        tags = tags.replace(", , ", ", ")
    if tags.startswith(", "):
        tags = tags[2:]
    if tags.endswith(", "):
        tags = tags[:-2]
    return tags


def clean_caption(caption: str) -> str:
    """The caption with :data:`CAPTION_REPLACEMENTS` applied in order, each until it no longer matches;
    the list is repeated until a whole pass changes nothing."""
    while True:
        before = caption
        for search, replacement in CAPTION_REPLACEMENTS:
            while search in caption:
                caption = caption.replace(search, replacement)
        if caption == before:
            return caption
