"""Generated text in six clearly different domains, for training a small MoE with learned locality.

Each domain has its own vocabulary and its own sentence templates (its grammar), and all share the
usual English function words ("the", "of", "and", "is", ...), so a small language model can learn
them apart and greedy continuations of a prompt stay in its domain. No downloads: everything comes
from the word lists below and a seeded `random.Random`, so the same seed gives the same text on every
machine and Python 3 version.

Templates hold slots `{SLOT}`: each occurrence is a fresh draw from the domain's list `SLOT`, except
slots ending in a digit (`{VAR1}`), which are drawn once per sentence and repeated (code reuses its
variable names, math its symbols). `{INT}` is a small integer, `{DEC}` a decimal number.
"""

from __future__ import annotations

import random
import re

_SLOT = re.compile(r"\{([A-Z]+)(\d?)\}")

_VOCAB: dict[str, dict[str, tuple[str, ...]]] = {
    "legal": {
        "PARTY": (
            "the plaintiff",
            "the defendant",
            "the appellant",
            "the respondent",
            "the tenant",
            "the landlord",
            "the lessee",
            "the lessor",
            "the claimant",
            "the trustee",
            "the employer",
            "the contractor",
            "the guarantor",
            "the licensee",
            "the insurer",
            "the petitioner",
        ),
        "COURT": (
            "the district court",
            "the court of appeals",
            "the supreme court",
            "the tribunal",
            "the trial court",
            "the arbitration panel",
            "the appellate division",
            "the chancery court",
        ),
        "DOC": (
            "contract",
            "lease",
            "statute",
            "indenture",
            "warranty",
            "covenant",
            "deed",
            "agreement",
            "affidavit",
            "injunction",
            "subpoena",
            "ordinance",
            "amendment",
            "clause",
            "provision",
        ),
        "ACT": (
            "breached",
            "rescinded",
            "ratified",
            "enforced",
            "waived",
            "terminated",
            "assigned",
            "construed",
            "invalidated",
            "upheld",
            "reversed",
            "affirmed",
            "dismissed",
            "remanded",
        ),
        "DOCTRINE": (
            "estoppel",
            "negligence",
            "consideration",
            "jurisdiction",
            "liability",
            "due process",
            "res judicata",
            "indemnification",
            "good faith",
            "fiduciary duty",
            "standing",
            "damages",
        ),
        "ADJ": (
            "binding",
            "enforceable",
            "void",
            "material",
            "reasonable",
            "statutory",
            "contractual",
            "equitable",
            "punitive",
            "compensatory",
            "unconscionable",
            "lawful",
            "procedural",
        ),
    },
    "code": {
        "FN": (
            "parse_header",
            "load_config",
            "compute_total",
            "merge_rows",
            "read_buffer",
            "flush_cache",
            "validate_input",
            "encode_frame",
            "split_tokens",
            "build_index",
            "fetch_batch",
            "emit_event",
            "resolve_path",
            "update_state",
            "serialize_node",
            "apply_patch",
        ),
        "VAR": (
            "items",
            "buf",
            "count",
            "offset",
            "node",
            "result",
            "key",
            "value",
            "path",
            "cfg",
            "rows",
            "index",
            "chunk",
            "size",
            "total",
            "queue",
            "frame",
            "token",
        ),
        "METHOD": (
            "append",
            "get",
            "pop",
            "items",
            "keys",
            "strip",
            "split",
            "join",
            "encode",
            "decode",
            "extend",
            "update",
            "copy",
            "sort",
            "read",
            "write",
        ),
        "TYPE": ("int", "str", "bytes", "list", "dict", "float", "bool", "tuple"),
        "EXC": ("ValueError", "KeyError", "IndexError", "TypeError", "RuntimeError", "OSError"),
        "CMP": ("==", "!=", "<", ">", "<=", ">="),
        "OP": ("+", "-", "*", "//", "%"),
    },
    "math": {
        "SYM": ("x", "y", "n", "k", "m", "p", "q", "a", "b", "z", "t", "r"),
        "FUNC": ("f", "g", "h", "phi", "psi"),
        "OBJ": (
            "prime",
            "integer",
            "polynomial",
            "matrix",
            "vector",
            "group",
            "ring",
            "field",
            "sequence",
            "series",
            "function",
            "set",
            "subspace",
            "eigenvalue",
            "derivative",
            "integral",
        ),
        "PROP": (
            "continuous",
            "bounded",
            "convergent",
            "invertible",
            "symmetric",
            "orthogonal",
            "finite",
            "compact",
            "linear",
            "monotone",
            "irreducible",
            "positive",
            "nonzero",
            "even",
            "odd",
        ),
        "THM": (
            "lemma",
            "theorem",
            "corollary",
            "proposition",
            "definition",
            "claim",
            "conjecture",
        ),
        "VERB": ("divides", "exceeds", "equals", "bounds", "generates", "annihilates", "maps to"),
    },
    "medicine": {
        "PATIENT": (
            "the patient",
            "a 54-year-old woman",
            "a 67-year-old man",
            "the infant",
            "the adolescent",
            "an elderly patient",
            "the pregnant patient",
            "a 32-year-old man",
        ),
        "SYMPTOM": (
            "fever",
            "chest pain",
            "dyspnea",
            "fatigue",
            "nausea",
            "headache",
            "cough",
            "edema",
            "tachycardia",
            "hypotension",
            "abdominal pain",
            "dizziness",
            "rash",
            "syncope",
        ),
        "DX": (
            "pneumonia",
            "sepsis",
            "heart failure",
            "diabetes",
            "hypertension",
            "asthma",
            "anemia",
            "stroke",
            "appendicitis",
            "myocardial infarction",
            "renal failure",
            "hepatitis",
        ),
        "DRUG": (
            "amoxicillin",
            "metformin",
            "lisinopril",
            "furosemide",
            "heparin",
            "insulin",
            "aspirin",
            "prednisone",
            "vancomycin",
            "atorvastatin",
            "morphine",
            "albuterol",
            "warfarin",
        ),
        "TEST": (
            "a chest radiograph",
            "an electrocardiogram",
            "blood cultures",
            "a complete blood count",
            "serum creatinine",
            "a CT scan",
            "an echocardiogram",
            "troponin levels",
            "a urinalysis",
        ),
        "ORGAN": ("heart", "lung", "kidney", "liver", "brain", "pancreas", "spleen", "bowel"),
        "ROUTE": ("orally", "intravenously", "subcutaneously", "by inhalation", "twice daily"),
    },
    "cooking": {
        "ING": (
            "butter",
            "flour",
            "garlic",
            "onion",
            "sugar",
            "olive oil",
            "salt",
            "pepper",
            "eggs",
            "cream",
            "basil",
            "lemon juice",
            "tomatoes",
            "mushrooms",
            "thyme",
            "ginger",
            "honey",
            "rice",
            "parmesan",
            "chicken stock",
            "cinnamon",
            "vanilla",
            "yeast",
            "shallots",
        ),
        "TOOL": (
            "skillet",
            "saucepan",
            "oven",
            "whisk",
            "baking sheet",
            "stockpot",
            "wooden spoon",
            "mixing bowl",
            "colander",
            "cutting board",
            "dutch oven",
            "food processor",
        ),
        "COOK": (
            "saute",
            "simmer",
            "whisk",
            "fold",
            "knead",
            "roast",
            "braise",
            "stir",
            "chop",
            "mince",
            "season",
            "drizzle",
            "sear",
            "bake",
            "blanch",
            "caramelize",
        ),
        "TEXTURE": (
            "golden",
            "tender",
            "crispy",
            "fluffy",
            "creamy",
            "glossy",
            "fragrant",
            "silky",
            "thick",
            "caramelized",
            "smooth",
            "bubbling",
        ),
        "DISH": (
            "risotto",
            "sourdough",
            "soup",
            "stew",
            "pasta",
            "tart",
            "omelette",
            "curry",
            "sauce",
            "pie",
            "salad",
            "bread",
            "custard",
            "gravy",
        ),
        "TIME": ("two minutes", "five minutes", "ten minutes", "half an hour", "an hour", "overnight"),
    },
    "sports": {
        "TEAM": (
            "the home side",
            "the visitors",
            "the champions",
            "the rookies",
            "the defending champions",
            "the underdogs",
            "the league leaders",
            "the hosts",
        ),
        "PLAYER": (
            "the striker",
            "the goalkeeper",
            "the captain",
            "the midfielder",
            "the point guard",
            "the pitcher",
            "the quarterback",
            "the winger",
            "the defender",
            "the substitute",
        ),
        "PLAY": (
            "scored",
            "equalized",
            "tackled",
            "dribbled",
            "intercepted",
            "blocked",
            "sprinted",
            "rebounded",
            "converted",
            "fumbled",
            "struck out",
            "headed home",
        ),
        "EVENT": (
            "a penalty",
            "a corner kick",
            "a free throw",
            "a home run",
            "a touchdown",
            "an own goal",
            "a hat trick",
            "a red card",
            "a three-pointer",
            "an overtime winner",
            "a breakaway",
        ),
        "STAGE": (
            "the first half",
            "the second half",
            "the final quarter",
            "extra time",
            "the ninth inning",
            "the playoffs",
            "the semifinal",
            "the championship game",
            "stoppage time",
        ),
        "STAT": ("points", "rebounds", "assists", "saves", "yards", "goals", "shots on target"),
    },
}

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "legal": (
        "{PARTY} alleged that {PARTY} {ACT} the {DOC} and sought {ADJ} damages.",
        "{COURT} held that the {DOC} was {ADJ} under the doctrine of {DOCTRINE}.",
        "On appeal, {COURT} {ACT} the judgment and remanded the case for further proceedings.",
        "The {DOC} provides that {PARTY} shall indemnify {PARTY} against any {ADJ} claim.",
        "Pursuant to section {INT} of the {DOC}, {PARTY} waived any defense of {DOCTRINE}.",
        "{PARTY} argued that the {DOC} was {ADJ} because it lacked {DOCTRINE}.",
        "The question of {DOCTRINE} is a matter of law for {COURT} to decide.",
        "Accordingly, the motion to dismiss is granted and the {DOC} is {ACT}.",
        "Under the {DOC}, {PARTY} owes a {ADJ} duty of {DOCTRINE} to {PARTY}.",
        "{COURT} found no {ADJ} breach of the {DOC} and {ACT} the award.",
        "It is well settled that a {ADJ} {DOC} cannot be {ACT} without notice to {PARTY}.",
        "Whereas {PARTY} and {PARTY} entered into the {DOC} on the date first written above.",
    ),
    "code": (
        "def {FN}({VAR1}, {VAR2}):\n    {VAR3} = {VAR1}.{METHOD}({VAR2})\n    return {VAR3}\n",
        "for {VAR1} in {VAR2}:\n    if {VAR1} {CMP} {INT}:\n        {VAR3}.{METHOD}({VAR1})\n",
        "    {VAR1} = {VAR2} {OP} {INT}\n",
        'if not isinstance({VAR1}, {TYPE}):\n    raise {EXC}("bad {VAR1}")\n',
        "    return {FN}({VAR}, {VAR})\n",
        "{VAR1}: {TYPE} = {FN}({VAR2})\n",
        "while {VAR1} {CMP} {VAR2}:\n    {VAR1} = {VAR1} {OP} {INT}\n",
        "try:\n    {VAR1} = {FN}({VAR2})\nexcept {EXC}:\n    {VAR1} = None\n",
        "# {FN} returns the {VAR} of the {VAR}\n",
        "{VAR1} = [{VAR2} for {VAR2} in {VAR3} if {VAR2} {CMP} {INT}]\n",
        "class {CLS}:\n    def __init__(self, {VAR1}):\n        self.{VAR1} = {VAR1}\n",
        "assert {FN}({VAR1}) {CMP} {INT}, {VAR1}\n",
    ),
    "math": (
        "Let {SYM1} be a {PROP} {OBJ} such that {SYM1} {VERB} {SYM2}.",
        "By the previous {THM}, the {OBJ} {FUNC}({SYM}) is {PROP} for every {SYM} > {INT}.",
        "Suppose that {SYM1}^{INT} + {SYM2} = {INT} and {SYM1} is {PROP}; then {SYM2} is {PROP}.",
        "{THMCAP} {INT}. Every {PROP} {OBJ} of degree {INT} is {PROP}.",
        "Proof. We proceed by induction on {SYM1}, the case {SYM1} = {INT} being trivial.",
        "Hence the {OBJ} is {PROP}, which completes the proof.",
        "It follows that {FUNC}({SYM1}) = {INT}{SYM1} + {INT} for all {SYM1} in the {OBJ}.",
        "Consider the {OBJ} of all {PROP} {OBJ}s modulo {INT}.",
        "Since {SYM1} {VERB} {SYM2}, the {OBJ} {FUNC} is {PROP} and therefore {PROP}.",
        "Integrating both sides from {INT} to {SYM1} gives the {PROP} bound {SYM2} <= {INT}{SYM1}.",
        "We claim that the {OBJ} generated by {SYM} and {SYM} is {PROP}.",
        "The determinant of the {OBJ} is {INT}, so the {OBJ} is {PROP}.",
    ),
    "medicine": (
        "{PATIENTCAP} presented with {SYMPTOM} and {SYMPTOM} of {INT} days duration.",
        "Physical examination revealed {SYMPTOM} and tenderness over the {ORGAN}.",
        "Laboratory workup included {TEST} and {TEST}, which were consistent with {DX}.",
        "The patient was started on {DRUG} {INT} mg {ROUTE} for suspected {DX}.",
        "{TEST} showed findings suggestive of {DX} involving the {ORGAN}.",
        "After {INT} days of {DRUG}, the {SYMPTOM} resolved and the patient was discharged.",
        "A history of {DX} and {DX} was noted, and {DRUG} was continued.",
        "The differential diagnosis included {DX}, {DX} and {DX}.",
        "Dose adjustment of {DRUG} is recommended in patients with impaired {ORGAN} function.",
        "Follow-up {TEST} in {INT} weeks was advised to monitor for recurrent {DX}.",
        "Adverse effects of {DRUG} include {SYMPTOM}, {SYMPTOM} and {ORGAN} toxicity.",
        "Vital signs showed {SYMPTOM} with a heart rate of {INT} beats per minute.",
    ),
    "cooking": (
        "{COOKCAP} the {ING} and the {ING} in a {TOOL} until {TEXTURE}.",
        "Add {INT} tablespoons of {ING} and {COOK} for {TIME}.",
        "Preheat the oven to {INT}0 degrees and grease a {TOOL} with {ING}.",
        "In a {TOOL}, {COOK} the {ING} with a pinch of {ING} until {TEXTURE}.",
        "Let the {DISH} rest for {TIME} before serving it with {ING}.",
        "This {DISH} is {TEXTURE} and {TEXTURE}, with a hint of {ING}.",
        "Stir in the {ING}, then {COOK} gently for {TIME}.",
        "Season the {DISH} with {ING} and {ING} to taste.",
        "For a {TEXTURE} {DISH}, {COOK} the {ING} before adding the {ING}.",
        "Transfer the mixture to a {TOOL} and {COOK} until {TEXTURE}.",
        "You will need {INT} cups of {ING}, {INT} cloves of {ING} and some {ING}.",
        "Serve the {DISH} warm, garnished with {ING} and a drizzle of {ING}.",
    ),
    "sports": (
        "{PLAYERCAP} {PLAY} in {STAGE} to give {TEAM} a {INT}-{INT} lead.",
        "{TEAMCAP} won {EVENT} late in {STAGE} but could not convert.",
        "With {INT} {STAT} and {INT} {STAT}, {PLAYER} led {TEAM} to the win.",
        "The coach praised {PLAYER}, who {PLAY} twice before {STAGE}.",
        "{TEAMCAP} trailed by {INT} points at the end of {STAGE}.",
        "A controversial call on {EVENT} sparked protests from {TEAM}.",
        "{PLAYERCAP} {PLAY} from the edge of the box and the crowd erupted.",
        "After {EVENT} in {STAGE}, {TEAM} sealed a {INT}-{INT} victory.",
        "{TEAMCAP} have now won {INT} straight games and lead the standings.",
        "It was the {INT}th time this season that {PLAYER} {PLAY} in {STAGE}.",
        "Fans celebrated as {PLAYER} lifted the trophy for {TEAM}.",
        "The match ended {INT}-{INT} after {EVENT} in {STAGE}.",
    ),
}

_CLASSES = ("Parser", "Cache", "Buffer", "Reader", "Writer", "Index", "Queue", "Node", "Frame", "Router")

DOMAINS: tuple[str, ...] = tuple(_TEMPLATES)


def _fill(template: str, domain: str, rng: random.Random) -> str:
    vocab = _VOCAB[domain]
    bound: dict[str, str] = {}

    def draw(match: re.Match[str]) -> str:
        name, tag = match.group(1), match.group(2)
        if tag and match.group(0) in bound:
            return bound[match.group(0)]
        if name == "INT":
            value = str(rng.choice((rng.randint(2, 9), rng.randint(10, 99))))
        elif name == "DEC":
            value = f"{rng.randint(0, 9)}.{rng.randint(0, 99):02d}"
        elif name == "CLS":
            value = rng.choice(_CLASSES)
        elif name.endswith("CAP") and name[:-3] in vocab:
            word = rng.choice(vocab[name[:-3]])
            value = word[:1].upper() + word[1:]
        else:
            value = rng.choice(vocab[name])
        if tag:
            bound[match.group(0)] = value
        return value

    return _SLOT.sub(draw, template)


def sentence(domain: str, rng: random.Random) -> str:
    """One sentence (for code: one to four lines) of `domain`."""
    if domain not in _TEMPLATES:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    text = _fill(rng.choice(_TEMPLATES[domain]), domain, rng)
    return text if domain == "code" else text[:1].upper() + text[1:]


def document(domain: str, rng: random.Random, num_sentences: int | None = None) -> str:
    """A paragraph of `num_sentences` (default: 4 to 10) sentences of `domain`."""
    count = rng.randint(4, 10) if num_sentences is None else num_sentences
    parts = [sentence(domain, rng) for _ in range(count)]
    sep = "" if domain == "code" else " "
    return sep.join(parts).strip()


def documents(domain: str, num_docs: int, seed: int) -> list[str]:
    """`num_docs` paragraphs of `domain`, deterministic for (`domain`, `seed`)."""
    rng = random.Random(f"{domain}:{seed}")
    return [document(domain, rng) for _ in range(num_docs)]


_WORD = re.compile(r"[a-z_]+")


def _domain_words() -> dict[str, frozenset[str]]:
    """Per domain, the words of its vocabulary and templates that no other domain uses."""
    words: dict[str, set[str]] = {}
    for domain, templates in _TEMPLATES.items():
        text = " ".join(templates) + " " + " ".join(" ".join(v) for v in _VOCAB[domain].values())
        words[domain] = set(_WORD.findall(_SLOT.sub(" ", text).lower()))
    return {
        d: frozenset(w for w in ws if not any(w in other for o, other in words.items() if o != d))
        for d, ws in words.items()
    }


_DOMAIN_WORDS = _domain_words()


def classify(text: str) -> str:
    """The domain whose own words occur most often in `text` ("" when none does): checks generated text."""
    hits = dict.fromkeys(DOMAINS, 0)
    for word in _WORD.findall(text.lower()):
        for domain, own in _DOMAIN_WORDS.items():
            if word in own:
                hits[domain] += 1
    best = max(hits, key=lambda d: hits[d])
    return best if hits[best] > 0 else ""
