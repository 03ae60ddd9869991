"""Kinetics-400 action names, and finding the action a prompt asks for (the ActPred reward's target).

Matching works on words, not characters: the prompt and every label are lower-cased and split into
words; articles and possessives ("a", "the", "his", ...) are ignored and a plural "s" is folded, so
"A young girl playing the piano" finds "playing piano" and "a boy riding his bikes" finds "riding a
bike", while "displaying guitar" finds nothing (whole words only). A label whose name carries a
qualifier in brackets also matches without it ("skiing" -> "skiing (not slalom or crosscountry)").
When several labels occur, the one with the most words wins ("playing bass guitar" over "playing
guitar", "drinking beer" over "drinking"); two different labels of the same length are ambiguous and
the prompt needs an explicit label. Explicit labels are given after a TAB in a prompts file:

    a man rocking out on stage<TAB>playing guitar
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from vader.errors import VaderError
from vader.prompts import TAB_HINT

# The 400 class names of Kinetics-400 (Kay et al. 2017) in class-index order, which is alphabetical;
# VideoMAE's Kinetics checkpoints use these names as `config.id2label`. Separated by " | ".
_KINETICS_400_TEXT = """
abseiling | air drumming | answering questions | applauding | applying cream | archery | arm wrestling |
arranging flowers | assembling computer | auctioning | baby waking up | baking cookies | balloon blowing
| bandaging | barbequing | bartending | beatboxing | bee keeping | belly dancing | bench pressing |
bending back | bending metal | biking through snow | blasting sand | blowing glass | blowing leaves |
blowing nose | blowing out candles | bobsledding | bookbinding | bouncing on trampoline | bowling |
braiding hair | breading or breadcrumbing | breakdancing | brush painting | brushing hair | brushing
teeth | building cabinet | building shed | bungee jumping | busking | canoeing or kayaking | capoeira |
carrying baby | cartwheeling | carving pumpkin | catching fish | catching or throwing baseball | catching
or throwing frisbee | catching or throwing softball | celebrating | changing oil | changing wheel |
checking tires | cheerleading | chopping wood | clapping | clay pottery making | clean and jerk |
cleaning floor | cleaning gutters | cleaning pool | cleaning shoes | cleaning toilet | cleaning windows |
climbing a rope | climbing ladder | climbing tree | contact juggling | cooking chicken | cooking egg |
cooking on campfire | cooking sausages | counting money | country line dancing | cracking neck |
crawling baby | crossing river | crying | curling hair | cutting nails | cutting pineapple | cutting
watermelon | dancing ballet | dancing charleston | dancing gangnam style | dancing macarena |
deadlifting | decorating the christmas tree | digging | dining | disc golfing | diving cliff | dodgeball
| doing aerobics | doing laundry | doing nails | drawing | dribbling basketball | drinking | drinking
beer | drinking shots | driving car | driving tractor | drop kicking | drumming fingers | dunking
basketball | dying hair | eating burger | eating cake | eating carrots | eating chips | eating doughnuts
| eating hotdog | eating ice cream | eating spaghetti | eating watermelon | egg hunting | exercising arm
| exercising with an exercise ball | extinguishing fire | faceplanting | feeding birds | feeding fish |
feeding goats | filling eyebrows | finger snapping | fixing hair | flipping pancake | flying kite |
folding clothes | folding napkins | folding paper | front raises | frying vegetables | garbage
collecting | gargling | getting a haircut | getting a tattoo | giving or receiving award | golf chipping
| golf driving | golf putting | grinding meat | grooming dog | grooming horse | gymnastics tumbling |
hammer throw | headbanging | headbutting | high jump | high kick | hitting baseball | hockey stop |
holding snake | hopscotch | hoverboarding | hugging | hula hooping | hurdling | hurling (sport) | ice
climbing | ice fishing | ice skating | ironing | javelin throw | jetskiing | jogging | juggling balls |
juggling fire | juggling soccer ball | jumping into pool | jumpstyle dancing | kicking field goal |
kicking soccer ball | kissing | kitesurfing | knitting | krumping | laughing | laying bricks | long jump
| lunge | making a cake | making a sandwich | making bed | making jewelry | making pizza | making
snowman | making sushi | making tea | marching | massaging back | massaging feet | massaging legs |
massaging person's head | milking cow | mopping floor | motorcycling | moving furniture | mowing lawn |
news anchoring | opening bottle | opening present | paragliding | parasailing | parkour | passing
American football (in game) | passing American football (not in game) | peeling apples | peeling
potatoes | petting animal (not cat) | petting cat | picking fruit | planting trees | plastering |
playing accordion | playing badminton | playing bagpipes | playing basketball | playing bass guitar |
playing cards | playing cello | playing chess | playing clarinet | playing controller | playing cricket
| playing cymbals | playing didgeridoo | playing drums | playing flute | playing guitar | playing
harmonica | playing harp | playing ice hockey | playing keyboard | playing kickball | playing monopoly
| playing organ | playing paintball | playing piano | playing poker | playing recorder | playing
saxophone | playing squash or racquetball | playing tennis | playing trombone | playing trumpet |
playing ukulele | playing violin | playing volleyball | playing xylophone | pole vault | presenting
weather forecast | pull ups | pumping fist | pumping gas | punching bag | punching person (boxing) |
push up | pushing car | pushing cart | pushing wheelchair | reading book | reading newspaper |
recording music | riding a bike | riding camel | riding elephant | riding mechanical bull | riding
mountain bike | riding mule | riding or walking with horse | riding scooter | riding unicycle | ripping
paper | robot dancing | rock climbing | rock scissors paper | roller skating | running on treadmill |
sailing | salsa dancing | sanding floor | scrambling eggs | scuba diving | setting table | shaking
hands | shaking head | sharpening knives | sharpening pencil | shaving head | shaving legs | shearing
sheep | shining shoes | shooting basketball | shooting goal (soccer) | shot put | shoveling snow |
shredding paper | shuffling cards | side kick | sign language interpreting | singing | situp |
skateboarding | ski jumping | skiing (not slalom or crosscountry) | skiing crosscountry | skiing slalom
| skipping rope | skydiving | slacklining | slapping | sled dog racing | smoking | smoking hookah |
snatch weight lifting | sneezing | sniffing | snorkeling | snowboarding | snowkiting | snowmobiling |
somersaulting | spinning poi | spray painting | spraying | springboard diving | squat | sticking tongue
out | stomping grapes | stretching arm | stretching leg | strumming guitar | surfing crowd | surfing
water | sweeping floor | swimming backstroke | swimming breast stroke | swimming butterfly stroke |
swing dancing | swinging legs | swinging on something | sword fighting | tai chi | taking a shower |
tango dancing | tap dancing | tapping guitar | tapping pen | tasting beer | tasting food | testifying |
texting | throwing axe | throwing ball | throwing discus | tickling | tobogganing | tossing coin |
tossing salad | training dog | trapezing | trimming or shaving beard | trimming trees | triple jump |
tying bow tie | tying knot (not on a tie) | tying tie | unboxing | unloading truck | using computer |
using remote controller (not gaming) | using segway | vault | waiting in line | walking the dog |
washing dishes | washing feet | washing hair | washing hands | water skiing | water sliding | watering
plants | waxing back | waxing chest | waxing eyebrows | waxing legs | weaving basket | welding |
whistling | windsurfing | wrapping present | wrestling | writing | yawning | yoga | zumba
"""

KINETICS_400: tuple[str, ...] = tuple(s.strip() for s in " ".join(_KINETICS_400_TEXT.split()).split("|"))

# Words that do not change which action is meant; dropped from prompts and labels before matching.
FILLER = frozenset({"a", "an", "the", "his", "her", "their", "its", "my", "our", "your", "some"})
# Extra words ignored when suggesting labels for a prompt that names none.
_STOP = FILLER | {"and", "at", "by", "for", "from", "in", "into", "is", "are", "of", "on", "or", "to",
                  "while", "with", "under", "over", "near", "up", "down", "man", "woman", "person",
                  "people", "boy", "girl", "young", "old", "child", "kid"}
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")
_BRACKETS = re.compile(r"\([^)]*\)")


def _fold(word: str) -> str:
    """A plural 's' off ("guitars" -> "guitar"); the same on both sides, so it only has to be consistent."""
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss") and "'" not in word:
        return word[:-1]
    return word


def words(text: str) -> tuple[str, ...]:
    """Lower-case words of `text` as matching sees them: fillers dropped, plurals folded."""
    found = _WORD.findall(text.lower().replace("\u2019", "'"))
    return tuple(_fold(w) for w in found if w not in FILLER)


def prompt_key(prompt: str) -> str:
    """How prompts are compared when looking up an explicit label: case, spacing and punctuation
    do not matter, so a label given for the raw prompt still applies to its cleaned form."""
    return " ".join(_WORD.findall(prompt.lower().replace("\u2019", "'")))


def _forms(label: str) -> tuple[tuple[str, ...], ...]:
    """Word sequences that mean `label`: the whole name (brackets dropped, their words kept) and,
    for a name with a bracketed qualifier, the name without it."""
    full = words(label.replace("(", " ").replace(")", " "))
    core = words(_BRACKETS.sub(" ", label))
    return (full,) if core == full or not core else (full, core)


@lru_cache(maxsize=16)
def _index(labels: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((label, form) for label in labels for form in _forms(label))


@dataclass(frozen=True)
class LabelMatch:
    label: str
    start: int  # word position in the prompt (after fillers are dropped)
    length: int  # words matched


def find_labels(prompt: str, labels: Iterable[str] = KINETICS_400) -> list[LabelMatch]:
    """Every label found in `prompt` (each once, by its longest, earliest form), longest first."""
    tokens = words(prompt)
    best: dict[str, LabelMatch] = {}
    for label, form in _index(tuple(labels)):
        n = len(form)
        for start in range(len(tokens) - n + 1):
            if tokens[start:start + n] == form:
                current = best.get(label)
                if current is None or (n, -start) > (current.length, -current.start):
                    best[label] = LabelMatch(label, start, n)
                break
    return sorted(best.values(), key=lambda m: (-m.length, m.start))


def match_label(prompt: str, labels: Iterable[str] = KINETICS_400) -> str | None:
    """The action `prompt` names (the longest label found), None if it names none.

    Raises VaderError when two different labels of the same, longest length occur.
    """
    found = find_labels(prompt, labels)
    if not found:
        return None
    top = [m.label for m in found if m.length == found[0].length]
    if len(top) > 1:
        names = ", ".join(repr(t) for t in top)
        raise VaderError(
            f"prompt {prompt!r} names several actions equally ({names}); say which one ActPred should "
            f"reward by giving it after a TAB in the prompts file ({TAB_HINT})"
        )
    return top[0]


def _stem(word: str) -> str:
    word = _fold(word)
    for suffix in ("ing", "ed", "e"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


@lru_cache(maxsize=16)
def _stems(labels: tuple[str, ...]) -> tuple[dict[str, frozenset[str]], dict[str, int]]:
    """Each label's content-word stems, and in how many labels each stem occurs."""
    per_label = {label: frozenset(_stem(w) for w in words(_BRACKETS.sub(" ", label)) if w not in _STOP)
                 for label in labels}
    counts: dict[str, int] = {}
    for stems in per_label.values():
        for s in stems:
            counts[s] = counts.get(s, 0) + 1
    return per_label, counts


def suggest_labels(text: str, labels: Iterable[str] = KINETICS_400, n: int = 5) -> list[str]:
    """Labels close to `text` (a prompt or a misspelt label): shared word stems first, a rare shared
    word ("guitar") counting more than a common one ("playing"), then similar spelling."""
    labels = tuple(labels)
    per_label, counts = _stems(labels)
    mine = {_stem(w) for w in words(text) if w not in _STOP}
    scored = []
    for label, theirs in per_label.items():
        shared = mine & theirs
        if shared:
            scored.append((-sum(1 / counts[s] for s in shared), -len(shared) / len(theirs), label))
    out = [label for *_, label in sorted(scored)][:n]
    lowered = {label.lower(): label for label in labels}
    for close in difflib.get_close_matches(" ".join(text.lower().split()), list(lowered), n=n, cutoff=0.6):
        if lowered[close] not in out:
            out.append(lowered[close])
    return out[:n]


def canonical_label(label: str, labels: Iterable[str] = KINETICS_400, prompt: str | None = None) -> str:
    """The classifier's own spelling of an explicitly given label (case and spacing do not matter;
    a bracketed qualifier may be left out when that leaves no doubt). VaderError if it is unknown."""
    labels = list(labels)
    wanted = " ".join(label.lower().split())
    for name in labels:
        if " ".join(name.lower().split()) == wanted:
            return name
    form = words(label)
    hits = {name for name, f in _index(tuple(labels)) if f == form}
    if len(hits) == 1:
        return hits.pop()
    close = suggest_labels(label, labels)
    where = f" (given for prompt {prompt!r})" if prompt is not None else ""
    hint = f"; close matches: {', '.join(repr(c) for c in close)}" if close else ""
    raise VaderError(
        f"action label {label!r}{where} is not one of the action classifier's {len(labels)} classes{hint}"
    )


def resolve_label(prompt: str, labels: Iterable[str] = KINETICS_400, explicit: str | None = None) -> str:
    """The action to reward for `prompt`: the explicit label when given, else the one the prompt names.

    Raises VaderError naming the prompt, the closest labels and how to give one explicitly.
    """
    labels = list(labels)
    if explicit is not None and explicit.strip():
        return canonical_label(explicit, labels, prompt)
    found = match_label(prompt, labels)
    if found is not None:
        return found
    close = suggest_labels(prompt, labels)
    hint = f"closest: {', '.join(repr(c) for c in close)}; " if close else ""
    example = close[0] if close else labels[0]
    raise VaderError(
        f"ActPred found no action in prompt {prompt!r}: the prompt must name one of the action "
        f"classifier's {len(labels)} classes (Kinetics-400 names such as 'playing guitar'); {hint}"
        f"name it in the prompt or give it after a TAB in the prompts file ({prompt.strip()}<TAB>{example})"
    )


__all__ = [
    "KINETICS_400", "LabelMatch", "canonical_label", "find_labels", "match_label", "prompt_key",
    "resolve_label", "suggest_labels", "words",
]
