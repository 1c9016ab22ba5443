#!/usr/bin/env python3
"""Deterministic generator for the small datasets under datasets/.

Usage:
    python3 scripts/gen_datasets.py          # (re)write every file under datasets/
    python3 scripts/gen_datasets.py --check  # regenerate in memory; exit 1 if a committed file differs

Standard library only (Python 3.11). Every random choice goes through one
random.Random(SEED) instance per output family, never the global `random`, and
nothing depends on set or hash ordering, so two runs give byte-identical files.

Outputs (all UTF-8, "\n" line ends, one compact JSON object per line):
    datasets/requests-json/train.jsonl  2,400 Alpaca rows  (instruction, input, output)
    datasets/requests-json/eval.jsonl     240 Alpaca rows
    datasets/chat/train.jsonl             300 chat rows    ({"messages": [...]})
    datasets/chat/eval.jsonl               40 chat rows
    datasets/bad/requests-bad.jsonl        10 rows, three of them deliberately malformed
    datasets/formats/text.jsonl            40 plain-text rows ({"text": ...})
    datasets/formats/text.jsonl.gz         the same bytes, gzipped (--check compares the unzipped text)
    datasets/formats/sharegpt.jsonl        40 ShareGPT rows ({"conversations": [{"from", "value"}]})
    datasets/formats/tools.jsonl           12 OpenAI chat rows with tool calls and tool messages
    datasets/bad/{text,sharegpt,tools}-bad.jsonl  a few rows each, some deliberately malformed
    datasets/README.md                    generated description (edit this script, not the README)
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path

SEED = 20240611
ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "datasets"

N_TRAIN, N_EVAL = 2400, 240
N_CHAT_TRAIN, N_CHAT_EVAL = 300, 40
MAX_INPUT_WORDS = 30
MAX_OUTPUT_CHARS = 150

# Probability that an eval row draws an entity from the held-out (eval-only) pool.
HELD_OUT_P = 0.6


def dumps(obj) -> str:
    """Compact JSON, non-ASCII kept, insertion key order. Used for every line and every output."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------
# Entity pools: "train" values may appear anywhere; "eval" values only in eval rows.
# ---------------------------------------------------------------------------

RESTAURANTS = {
    "train": [
        "The Blue Lantern", "Casa Verde", "Olive & Thyme", "Golden Wok", "Le Petit Four",
        "Saffron House", "The Copper Pot", "Bella Notte", "Sakura Garden", "The Hungry Fox",
        "Marigold Kitchen", "Harbor Grill", "La Piazza", "Spice Route", "The Green Fork",
        "Little Lisbon", "Maple & Rye", "Noodle Bar 88", "The Red Door", "Café Aurora",
        "Taverna Mykonos", "Smoke & Oak", "The Salt Cellar", "Lotus Court", "El Faro",
        "Juniper Table", "The Gilded Spoon", "Pho Saigon", "Brick Lane Curry", "Wildflower Bistro",
    ],
    "eval": [
        "The Silver Birch", "Casa Luna", "Moonfish", "The Iron Kettle", "Tamarind Tree",
        "Villa Rosa", "Kettle & Crumb", "Ember Room",
    ],
}

PEOPLE_NAMES = {
    "train": [
        "Alice", "Ben", "Carlos", "Dana", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas",
        "Kemi", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq",
        "Uma", "Victor", "Wen", "Yusuf", "Zoe", "Maria Lopez", "Tom Becker", "Aisha Khan",
        "Jack Murphy", "Sofia Rossi",
    ],
    "eval": [
        "Bruno", "Chloe", "Dmitri", "Elena", "Ingrid", "Kenji", "Lucia", "Mateo", "Nadia Haddad",
        "Omar Diallo",
    ],
}

CITIES = {
    "train": [
        "Lisbon", "Oslo", "Berlin", "Madrid", "Rome", "Paris", "Vienna", "Prague", "Dublin",
        "Athens", "Tokyo", "Seoul", "Toronto", "Chicago", "Boston", "Denver", "Seattle",
        "Sydney", "Cairo", "Nairobi", "Lima", "Bogotá", "Mumbai", "Bangkok", "Istanbul",
        "Warsaw", "Helsinki", "Zurich", "Montreal", "Austin", "New York", "Cape Town",
        "Buenos Aires", "Mexico City",
    ],
    "eval": [
        "Porto", "Kraków", "Edinburgh", "Osaka", "Vancouver", "Marrakesh", "Santiago", "Hanoi",
        "San Diego", "Tel Aviv",
    ],
}

ARTISTS = {
    "train": [
        "Velvet Harbor", "Nina Solis", "The Midnight Owls", "Jasper Crane", "Luna Park Trio",
        "Ada Moreno", "Static Gardens", "The Paper Lions", "Kofi Mensah", "Echo Valley",
        "Mira Kaur", "The Slow Rivers", "DJ Lumen", "Hazel and the Hounds", "Tomas Berg",
        "Silver Canyon", "June Okafor", "The Tin Kites",
    ],
    "eval": ["Coral Static", "Ines Varga", "The Lamplighters", "Rafe Okoro", "Blue Meridian"],
}

SONGS = {
    "train": [
        "Paper Moons", "Golden Hour Drive", "Cold Coffee", "Northern Lights", "Glass Houses",
        "Summer in Reverse", "Slow Dancer", "Highway Hymn", "Lemon Tree Road", "Static Heart",
        "Waves of Blue", "Midnight Bakery", "Falling Upward", "Empty Stations", "Sugar Rain",
        "Little Fires", "Open Window", "Borrowed Time", "Silver Lining Blues", "Ocean Mile",
    ],
    "eval": ["Copper Skies", "Late Train Home", "Wildflower Avenue", "Neon Harbor", "Quiet Thunder"],
}

GENRES = {
    "train": [
        "jazz", "rock", "classical", "hip hop", "lo-fi", "country", "reggae", "blues", "folk",
        "electronic", "soul", "metal", "pop", "ambient", "disco",
    ],
    "eval": ["bossa nova", "funk", "gospel"],
}

ROOMS = {
    "train": ["kitchen", "living room", "bedroom", "office", "bathroom", "garage", "patio", "kids' room"],
    "eval": ["dining room", "study", "basement"],
}

# (singular, plural, takes a size)
DISHES = {
    "train": [
        ("pepperoni pizza", "pepperoni pizzas", True), ("margherita pizza", "margherita pizzas", True),
        ("chicken burrito", "chicken burritos", False), ("veggie burger", "veggie burgers", False),
        ("cheeseburger", "cheeseburgers", False), ("caesar salad", "caesar salads", True),
        ("falafel wrap", "falafel wraps", False), ("beef taco", "beef tacos", False),
        ("chicken curry", "chicken curries", True), ("sushi roll", "sushi rolls", False),
        ("ramen bowl", "ramen bowls", True), ("club sandwich", "club sandwiches", False),
        ("fish taco", "fish tacos", False), ("mushroom risotto", "mushroom risottos", True),
        ("iced latte", "iced lattes", True), ("chocolate milkshake", "chocolate milkshakes", True),
        ("everything bagel", "everything bagels", False), ("almond croissant", "almond croissants", False),
        ("order of fries", "orders of fries", True), ("hot dog", "hot dogs", False),
    ],
    "eval": [
        ("lamb kebab", "lamb kebabs", False), ("tofu poke bowl", "tofu poke bowls", True),
        ("spinach calzone", "spinach calzones", True), ("shrimp quesadilla", "shrimp quesadillas", False),
        ("orange smoothie", "orange smoothies", True),
    ],
}

TASKS = {
    "train": [
        "call the dentist", "pay the rent", "water the plants", "buy milk", "take out the trash",
        "send the report to Paula", "pick up the kids", "renew my passport", "book a haircut",
        "feed the cat", "submit my timesheet", "call mom", "charge the car", "back up my laptop",
        "return the library books", "order a birthday cake", "check the oven", "stretch",
        "move the car", "text Grandpa", "buy batteries", "walk the dog", "take my vitamins",
        "clean the fridge", "update the budget sheet",
    ],
    "eval": [
        "cancel the gym membership", "email the landlord", "defrost the chicken",
        "refill my prescription", "wash the car", "pack my suitcase",
    ],
}

ALARM_LABELS = {
    "train": ["Gym", "Wake up", "Meds", "School run", "Standup", "Yoga", "Flight", "Bake bread",
              "Run", "Lunch break", "Study", "Bus"],
    "eval": ["Piano practice", "Dog walk", "Train"],
}

MONEY_NOTES = {
    "train": ["dinner", "rent", "concert tickets", "the taxi", "groceries", "the birthday gift",
              "lunch", "the electricity bill", "the hotel", "movie tickets", "coffee", "the book"],
    "eval": ["the ski trip", "pizza night", "the wedding gift"],
}

# ---------------------------------------------------------------------------
# Small rendering helpers
# ---------------------------------------------------------------------------

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
        "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
DAY_ABBR = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


def words(n: int) -> str:
    """English words for 0 <= n <= 999."""
    if n < 20:
        return ONES[n]
    if n < 100:
        t, o = divmod(n, 10)
        return TENS[t] + ("-" + ONES[o] if o else "")
    h, rest = divmod(n, 100)
    head = ONES[h] + " hundred"
    return head + (" and " + words(rest) if rest else "")


def ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    return f"{n}" + {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def count_text(rng: random.Random, n: int, p_words: float = 0.5) -> str:
    """A small count as digits or words ("4" / "four")."""
    return words(n) if rng.random() < p_words else str(n)


class Picker:
    """Chooses entity values; eval rows prefer held-out values."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split = rng, split

    def __call__(self, pool: dict):
        if self.split == "eval" and self.rng.random() < HELD_OUT_P:
            return self.rng.choice(pool["eval"])
        return self.rng.choice(pool["train"])


def period_words(h: int) -> str | None:
    if 5 <= h <= 11:
        return "in the morning"
    if 12 <= h <= 16:
        return "in the afternoon"
    if 17 <= h <= 20:
        return "in the evening"
    if 21 <= h <= 23:
        return "at night"
    return None


def render_time(rng: random.Random, h: int, m: int, compact: bool = False) -> str:
    """Text for a clock time; the normalised value is always f"{h:02d}:{m:02d}".

    compact=True restricts to forms that fit as an adjective ("a 7am alarm")."""
    h12 = h % 12 or 12
    ampm = "am" if h < 12 else "pm"
    styles = []
    if m == 0:
        styles += ["h_ampm"] * 3
    styles += ["hm_ampm"] * 2
    styles += ["24h"] * 2
    per = period_words(h)
    if not compact and per and m in (0, 15, 30, 45) and h != 12:
        styles += ["words"] * 2
    if not compact and m in (0, 15, 30, 45) and h != 0:
        styles += ["words_ampm"]
    if (h, m) in ((12, 0), (0, 0)):
        styles += ["special"] * 4
    style = rng.choice(styles)
    suffix = rng.choice([ampm, " " + ampm, " " + ampm[0] + "." + ampm[1] + ".", ampm.upper(), " " + ampm.upper()])
    if style == "h_ampm":
        return f"{h12}{suffix}"
    if style == "hm_ampm":
        return f"{h12}:{m:02d}{suffix}"
    if style == "24h":
        return f"{h:02d}:{m:02d}"
    if style == "special":
        return rng.choice(["noon", "midday"]) if h == 12 else "midnight"
    if style == "words_ampm":
        mins = "" if m == 0 else " " + words(m)
        return f"{words(h12)}{mins} {rng.choice([ampm, ampm[0] + '.' + ampm[1] + '.'])}"
    # style == "words"
    if m == 0:
        core = rng.choice([f"{words(h12)} o'clock", words(h12)])
    elif m == 15:
        core = f"quarter past {words(h12)}"
    elif m == 30:
        core = rng.choice([f"half past {words(h12)}", f"{words(h12)} thirty"])
    else:  # 45
        core = f"quarter to {words(h12 % 12 + 1)}"
    return f"{core} {per}"


def day_phrase(rng: random.Random, day: str, time_h: int | None) -> str:
    """Text for a relative day; day is 'today', 'tomorrow' or a weekday name."""
    if day == "today":
        opts = ["today"]
        if time_h is None or time_h >= 17:
            opts += ["tonight"]
        return rng.choice(opts)
    if day == "tomorrow":
        return "tomorrow"
    name = day.capitalize()
    return rng.choice([f"on {name}", f"this {name}", f"on {name}", name])


def when_phrase(rng: random.Random, day_text: str | None, time_text: str | None) -> str:
    """' tomorrow at 7pm' / ' at 7pm on Friday' / ' on Friday' / ' at 7pm' / ''."""
    if day_text and time_text:
        if rng.random() < 0.6:
            return f" {day_text} at {time_text}"
        return f" at {time_text} {day_text}"
    if day_text:
        return f" {day_text}"
    if time_text:
        return f" at {time_text}"
    return ""


def pick_day(rng: random.Random) -> str:
    return rng.choice(["today", "tomorrow", "tomorrow"] + WEEKDAYS)


def fmt_amount(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:.2f}"


def json_amount(x: float):
    return int(x) if x == int(x) else round(x, 2)


# ---------------------------------------------------------------------------
# Sentence wrapping: templates are lower-case-initial; kind says how they may be wrapped.
#   imp  - imperative ("book a table ..."): may take please / could you ... ?
#   free - statement ("I'd like ..."): may take a greeting and a thanks
#   q    - question ("what's the weather ..."): ends with "?"
# ---------------------------------------------------------------------------

def finish(rng: random.Random, core: str, kind: str) -> str:
    core = " ".join(core.split())
    greeting = rng.choice(["", "", "", "", "", "Hi, ", "Hey, ", "Hello! ", "Hey there, "])
    if kind == "imp":
        prefix = rng.choice(["", "", "", "", "please ", "please ", "could you ", "can you ",
                             "can you please ", "would you ", "could you please "])
        if prefix.startswith(("could", "can", "would")):
            end = "?"
        else:
            end = rng.choice(["", ".", ".", ".", "!", ", please.", " please", ", thanks.",
                              ". Thanks!", ". Thank you."])
            if prefix == "please " and "please" in end:
                end = "."
        text = prefix + core + end
    elif kind == "free":
        end = rng.choice(["", ".", ".", ".", ", please.", ". Thanks!", ", thank you."])
        text = core + end
    else:  # q
        end = rng.choice(["?", "?", "?", "? Thanks!", "? Thank you."])
        text = core + end
    if core.endswith("."):
        text = text.replace(core + ".", core, 1)  # "... 7 p.m." + "." -> a single period
    # Capitalise the sentence start; after "Hi, " / "Hey, " the sentence continues in lower case.
    if greeting.endswith(", "):
        return greeting + text
    return greeting + text[:1].upper() + text[1:]


# ---------------------------------------------------------------------------
# Intent generators. Each returns (input_text, output_dict); output keys are in the
# fixed per-intent order, and optional fields absent from the text are omitted.
# ---------------------------------------------------------------------------

def gen_book_table(rng: random.Random, pick: Picker):
    restaurant = pick(RESTAURANTS)
    people = rng.choice([1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 7, 8, 10, 12])
    day = pick_day(rng) if rng.random() < 0.75 else None
    has_time = rng.random() < 0.75
    h = m = None
    if has_time:
        h = rng.choice([11, 12, 12, 13, 13, 17, 18, 18, 19, 19, 19, 20, 20, 21, 22])
        m = rng.choice([0, 0, 0, 0, 15, 30, 30, 45])
    time_text = render_time(rng, h, m) if has_time else None
    day_text = day_phrase(rng, day, h) if day else None
    when = when_phrase(rng, day_text, time_text)

    n = count_text(rng, people)
    if people == 1:
        ppl = rng.choice([f"{n} person", "one", "just one person", "a single person"])
    else:
        ppl = rng.choice([f"{n} people", f"{n}", f"a party of {n}", f"{n} guests", f"{n} of us"])

    templates = [
        ("imp", f"book a table at {restaurant} for {ppl}{when}"),
        ("imp", f"reserve a table for {ppl} at {restaurant}{when}"),
        ("imp", f"make a reservation at {restaurant} for {ppl}{when}"),
        ("imp", f"book {restaurant} for {ppl}{when}"),
        ("imp", f"get us a table at {restaurant}{when}, {ppl}"),
        ("free", f"I'd like to book a table for {ppl} at {restaurant}{when}"),
        ("free", f"we need a table at {restaurant} for {ppl}{when}"),
        ("free", f"table for {ppl} at {restaurant}{when}"),
        ("q", f"can I get a table for {ppl} at {restaurant}{when}"),
        ("free", f"I want to reserve {restaurant}{when} for {ppl}"),
    ]
    kind, core = rng.choice(templates)
    out = {"intent": "book_table", "restaurant": restaurant, "people": people}
    if day:
        out["day"] = day
    if has_time:
        out["time"] = f"{h:02d}:{m:02d}"
    return finish(rng, core, kind), out


def gen_set_alarm(rng: random.Random, pick: Picker):
    h = rng.choice([4, 5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 9, 10, 12, 13, 14, 15, 16, 18, 21, 22, 23, 0, 0, 0])
    m = rng.choice([0, 0, 0, 0, 5, 10, 15, 20, 30, 30, 40, 45, 50])

    days = None
    days_text = ""
    r = rng.random()
    if r < 0.15:
        days = list(DAY_ABBR)
        days_text = rng.choice([" every day", " daily", " every single day"])
    elif r < 0.35:
        days = DAY_ABBR[:5]
        days_text = rng.choice([" on weekdays", " every weekday", " Monday to Friday", " on workdays"])
    elif r < 0.45:
        days = DAY_ABBR[5:]
        days_text = rng.choice([" on weekends", " every weekend", " on Saturdays and Sundays"])
    elif r < 0.7:
        k = rng.choice([1, 1, 2, 2, 3])
        idx = sorted(rng.sample(range(7), k))
        if idx == [5, 6]:
            idx = [4, 6]
        days = [DAY_ABBR[i] for i in idx]
        plural = rng.random() < 0.6
        names = [WEEKDAYS[i].capitalize() + ("s" if plural else "") for i in idx]
        if len(names) == 1:
            joined = names[0]
        elif len(names) == 2:
            joined = f"{names[0]} and {names[1]}"
        else:
            joined = f"{names[0]}, {names[1]} and {names[2]}"
        days_text = " " + (rng.choice(["on", "every"]) if not plural else "on") + " " + joined

    label = pick(ALARM_LABELS) if rng.random() < 0.4 else None
    label_text = ""
    if label:
        q = rng.choice(["'", '"'])
        label_text = rng.choice([f" labelled {q}{label}{q}", f" called {q}{label}{q}",
                                 f" with the label {q}{label}{q}", f" named {q}{label}{q}"])

    compact_tmpl = rng.random() < 0.15
    t = render_time(rng, h, m, compact=compact_tmpl)
    if compact_tmpl:
        templates = [("imp", f"add a {t} alarm{days_text}{label_text}"),
                     ("free", f"I need a {t} alarm{days_text}{label_text}")]
    else:
        templates = [
            ("imp", f"set an alarm for {t}{days_text}{label_text}"),
            ("imp", f"wake me up at {t}{days_text}{label_text}"),
            ("imp", f"create an alarm at {t}{days_text}{label_text}"),
            ("imp", f"schedule an alarm{days_text} at {t}{label_text}"),
            ("free", f"I need to wake up at {t}{days_text}{label_text}"),
            ("free", f"alarm at {t}{days_text}{label_text}"),
            ("free", f"I want an alarm for {t}{days_text}{label_text}"),
            ("imp", f"set my alarm to {t}{days_text}{label_text}"),
        ]
    kind, core = rng.choice(templates)
    out = {"intent": "set_alarm", "time": f"{h:02d}:{m:02d}"}
    if days:
        out["days"] = days
    if label:
        out["label"] = label
    return finish(rng, core, kind), out


CURRENCY_FORMS = {
    # code: list of (format, allows number words)
    "USD": [("${a}", False), ("{a} dollars", True), ("{a} USD", False), ("USD {a}", False), ("{a} bucks", True)],
    "EUR": [("€{a}", False), ("{a} euros", True), ("{a} EUR", False), ("EUR {a}", False)],
    "GBP": [("£{a}", False), ("{a} pounds", True), ("{a} GBP", False), ("{a} quid", True)],
    "JPY": [("¥{a}", False), ("{a} yen", False), ("{a} JPY", False)],
    "CAD": [("{a} Canadian dollars", True), ("CA${a}", False), ("{a} CAD", False)],
    "CHF": [("{a} Swiss francs", True), ("CHF {a}", False)],
}
CURRENCY_ORDER = ["USD", "USD", "USD", "EUR", "EUR", "EUR", "GBP", "GBP", "JPY", "CAD", "CHF"]


def gen_send_money(rng: random.Random, pick: Picker):
    cur = rng.choice(CURRENCY_ORDER)
    if cur == "JPY":
        amount = float(rng.choice(range(5, 201)) * 100)
    else:
        r = rng.random()
        if r < 0.45:
            amount = float(rng.choice(range(1, 61)) * 5)
        elif r < 0.75:
            amount = float(rng.randint(1, 400))
        elif r < 0.9:
            amount = rng.randint(1, 120) + rng.choice([0.5, 0.25, 0.75, 0.99, 0.2, 0.4])
        else:
            amount = float(rng.choice(range(5, 31)) * 100)
    fmt, allow_words = rng.choice(CURRENCY_FORMS[cur])
    whole = amount == int(amount)
    if allow_words and whole and amount <= 999 and (amount % 5 == 0 or amount < 20) and rng.random() < 0.5:
        a = words(int(amount))
        if a.startswith("one hundred") and rng.random() < 0.5:
            a = "a" + a[3:]
    elif whole and amount >= 1000 and rng.random() < 0.5:
        a = f"{int(amount):,}"
    else:
        a = fmt_amount(amount)
        if whole and cur != "JPY" and fmt.startswith(("$", "€", "£")) and rng.random() < 0.15:
            a += ".00"
    money = fmt.format(a=a)

    recipient = pick(PEOPLE_NAMES)
    note = pick(MONEY_NOTES) if rng.random() < 0.4 else None
    nt = f" for {note}" if note else ""
    templates = [
        ("imp", f"send {money} to {recipient}{nt}"),
        ("imp", f"transfer {money} to {recipient}{nt}"),
        ("imp", f"pay {recipient} {money}{nt}"),
        ("imp", f"wire {money} to {recipient}{nt}"),
        ("imp", f"send {recipient} {money}{nt}"),
        ("imp", f"move {money} over to {recipient}{nt}"),
        ("free", f"I want to send {money} to {recipient}{nt}"),
        ("free", f"I owe {recipient} {money}{nt}, send it to them"),
        ("free", f"{recipient} should get {money} from me{nt}"),
        ("q", f"can you send {recipient} {money}{nt}"),
    ]
    kind, core = rng.choice(templates)
    out = {"intent": "send_money", "amount": json_amount(amount), "currency": cur, "recipient": recipient}
    if note:
        out["note"] = note
    return finish(rng, core, kind), out


CLASS_FORMS = {
    "economy": [" in economy", " economy class", " in coach", ", economy"],
    "premium_economy": [" in premium economy", " premium economy"],
    "business": [" in business class", " business class", " in business", ", business class"],
    "first": [" in first class", " first class"],
}


def gen_book_flight(rng: random.Random, pick: Picker):
    src = pick(CITIES)
    dst = pick(CITIES)
    while dst == src:
        dst = pick(CITIES)
    has_date = rng.random() < 0.8
    date_text = ""
    if has_date:
        month = rng.randint(1, 12)
        day = rng.randint(1, 28)
        mn = MONTHS[month - 1]
        short = mn[:3]
        form = rng.choice([f"{mn} {day}", f"{mn} {ordinal(day)}", f"{day} {mn}", f"the {ordinal(day)} of {mn}",
                           f"{ordinal(day)} {mn}", f"{short} {day}"])
        date_text = f" on {form}"
    pax = rng.choice([1, 1, 2, 2, 2, 3, 4, 5, 6]) if rng.random() < 0.55 else None
    pax_text = ""
    if pax:
        n = count_text(rng, pax)
        if pax == 1:
            pax_text = rng.choice([" for one passenger", " for 1 passenger", " for one adult", " for one person"])
        else:
            pax_text = rng.choice([f" for {n} passengers", f" for {n} people", f" for {n} adults"])
    cls = rng.choice(["economy", "economy", "premium_economy", "business", "business", "first"]) \
        if rng.random() < 0.5 else None
    cls_text = rng.choice(CLASS_FORMS[cls]) if cls else ""

    # Shuffle the order of the optional tail a little.
    tail_parts = [date_text, pax_text, cls_text]
    if rng.random() < 0.3:
        tail_parts = [pax_text, date_text, cls_text]
    tail = "".join(tail_parts)
    templates = [
        ("imp", f"book a flight from {src} to {dst}{tail}"),
        ("imp", f"find me a flight to {dst} from {src}{tail}"),
        ("imp", f"get me on a flight from {src} to {dst}{tail}"),
        ("free", f"I need to fly from {src} to {dst}{tail}"),
        ("free", f"flight {src} to {dst}{tail}"),
        ("free", f"we want to fly {src} to {dst}{tail}"),
        ("imp", f"reserve a flight to {dst} departing {src}{tail}"),
        ("imp", f"book me {src} to {dst}{tail}"),
    ]
    if pax and pax > 1:
        n = count_text(rng, pax)
        templates.append(("imp", f"get {n} tickets from {src} to {dst}{date_text}{cls_text}"))
    kind, core = rng.choice(templates)
    out = {"intent": "book_flight", "from": src, "to": dst}
    if has_date:
        out["date"] = f"{month:02d}-{day:02d}"
    if pax:
        out["passengers"] = pax
    if cls:
        out["class"] = cls
    return finish(rng, core, kind), out


def gen_order_food(rng: random.Random, pick: Picker):
    sing, plur, sized = pick(DISHES)
    qty = rng.choice([1, 1, 1, 2, 2, 3, 4, 5, 6])
    size = rng.choice(["small", "medium", "large", "large"]) if sized and rng.random() < 0.5 else None
    noun = sing if qty == 1 else plur
    size_text = f"{size} " if size else ""
    if qty == 1:
        first = (size or sing)[0]
        art = "an" if first in "aeiou" else "a"
        q = rng.choice([art, art, "one", "1"])
    else:
        q = count_text(rng, qty)
    item = f"{q} {size_text}{noun}"
    method = rng.choice(["delivery", "pickup"]) if rng.random() < 0.6 else None
    method_text = ""
    if method == "delivery":
        method_text = rng.choice([" for delivery", " delivered", " to be delivered", " delivered to my place"])
    elif method == "pickup":
        method_text = rng.choice([" for pickup", " for collection", " to pick up", " for takeaway pickup"])
    templates = [
        ("imp", f"order {item}{method_text}"),
        ("imp", f"get me {item}{method_text}"),
        ("free", f"I'd like {item}{method_text}"),
        ("q", f"can I get {item}{method_text}"),
        ("imp", f"place an order for {item}{method_text}"),
        ("free", f"I want to order {item}{method_text}"),
        ("imp", f"put in an order for {item}{method_text}"),
        ("free", f"we'd like to order {item}{method_text}"),
    ]
    kind, core = rng.choice(templates)
    out = {"intent": "order_food", "dish": sing, "quantity": qty}
    if size:
        out["size"] = size
    if method:
        out["method"] = method
    return finish(rng, core, kind), out


def gen_weather_query(rng: random.Random, pick: Picker):
    city = pick(CITIES)
    day = rng.choice(["today", "tomorrow", "tomorrow", "weekend"] + WEEKDAYS) if rng.random() < 0.7 else None
    if day is None:
        day_text = ""
    elif day == "today":
        day_text = rng.choice([" today", " right now", " this afternoon"])
    elif day == "tomorrow":
        day_text = " tomorrow"
    elif day == "weekend":
        day_text = rng.choice([" this weekend", " over the weekend", " on the weekend"])
    else:
        day_text = rng.choice([f" on {day.capitalize()}", f" this {day.capitalize()}"])
    unit = rng.choice(["celsius", "fahrenheit"]) if rng.random() < 0.35 else None
    unit_text = ""
    if unit == "celsius":
        unit_text = rng.choice([" in Celsius", " in degrees Celsius", " in °C", " in celsius"])
    elif unit == "fahrenheit":
        unit_text = rng.choice([" in Fahrenheit", " in degrees Fahrenheit", " in °F", " in fahrenheit"])
    templates = [
        ("q", f"what's the weather in {city}{day_text}{unit_text}"),
        ("q", f"what will the weather be like in {city}{day_text}{unit_text}"),
        ("imp", f"give me the forecast for {city}{day_text}{unit_text}"),
        ("imp", f"tell me the weather in {city}{day_text}{unit_text}"),
        ("imp", f"check the weather for {city}{day_text}{unit_text}"),
        ("q", f"how warm is it going to be in {city}{day_text}{unit_text}"),
        ("q", f"what's the temperature in {city}{day_text}{unit_text}"),
        ("free", f"I'd like the weather forecast for {city}{day_text}{unit_text}"),
        ("q", f"is it going to rain in {city}{day_text}"),
        ("q", f"do I need an umbrella in {city}{day_text}"),
    ]
    if not unit:
        kind, core = rng.choice(templates)
    else:
        kind, core = rng.choice(templates[:8])
    out = {"intent": "weather_query", "city": city}
    if day:
        out["day"] = day
    if unit:
        out["unit"] = unit
    return finish(rng, core, kind), out


def gen_create_reminder(rng: random.Random, pick: Picker):
    task = pick(TASKS)
    day = pick_day(rng) if rng.random() < 0.65 else None
    has_time = rng.random() < 0.65
    h = m = None
    if has_time:
        h = rng.randint(6, 22)
        m = rng.choice([0, 0, 0, 10, 15, 20, 30, 30, 45])
    time_text = render_time(rng, h, m) if has_time else None
    day_text = day_phrase(rng, day, h) if day else None
    when = when_phrase(rng, day_text, time_text)
    templates = [
        ("imp", f"remind me to {task}{when}"),
        ("imp", f"set a reminder to {task}{when}"),
        ("imp", f"create a reminder to {task}{when}"),
        ("imp", f"don't let me forget to {task}{when}"),
        ("imp", f"add a reminder{when} to {task}"),
        ("free", f"I need a reminder to {task}{when}"),
        ("imp", f"ping me{when} to {task}"),
        ("free", f"reminder: {task}{when}"),
    ]
    if when:
        front = when.strip()
        templates.append(("free", f"{front}, remind me to {task}"))
    kind, core = rng.choice(templates)
    out = {"intent": "create_reminder", "task": task}
    if day:
        out["day"] = day
    if has_time:
        out["time"] = f"{h:02d}:{m:02d}"
    return finish(rng, core, kind), out


def possessive(name: str) -> str:
    return name + ("'" if name.endswith("s") else "'s")


def gen_play_music(rng: random.Random, pick: Picker):
    combo = rng.choice(["song_artist", "song_artist", "song", "artist", "artist", "genre", "genre"])
    song = pick(SONGS) if combo.startswith("song") else None
    artist = pick(ARTISTS) if combo in ("song_artist", "artist") else None
    genre = pick(GENRES) if combo == "genre" else None
    room = pick(ROOMS) if rng.random() < 0.45 else None
    room_text = ""
    if room:
        prep = "on" if room == "patio" else "in"
        room_text = rng.choice([f" {prep} the {room}", f" on the {room} speaker", f" {prep} the {room}"])
    if song:
        q = rng.choice(["", "", "'", '"'])
        s = f"{q}{song}{q}"
    if combo == "song_artist":
        templates = [
            ("imp", f"play {s} by {artist}{room_text}"),
            ("imp", f"put on {s} by {artist}{room_text}"),
            ("free", f"I want to hear {s} by {artist}{room_text}"),
            ("imp", f"play the song {s} by {artist}{room_text}"),
            ("imp", f"play {possessive(artist)} song {s}{room_text}"),
            ("imp", f"queue up {s} by {artist}{room_text}"),
        ]
    elif combo == "song":
        templates = [
            ("imp", f"play the song {s}{room_text}"),
            ("imp", f"play the track {s}{room_text}"),
            ("imp", f"put on the song {s}{room_text}"),
            ("free", f"I want to listen to the song {s}{room_text}"),
            ("imp", f"start the track {s}{room_text}"),
            ("imp", f"queue the song {s}{room_text}"),
        ]
    elif combo == "artist":
        templates = [
            ("imp", f"play something by {artist}{room_text}"),
            ("imp", f"play music by {artist}{room_text}"),
            ("free", f"I'm in the mood for some music by {artist}{room_text}"),
            ("imp", f"shuffle songs by {artist}{room_text}"),
            ("imp", f"put on the artist {artist}{room_text}"),
            ("free", f"I want to hear songs by {artist}{room_text}"),
        ]
    else:
        templates = [
            ("imp", f"play some {genre}{room_text}"),
            ("imp", f"put on some {genre} music{room_text}"),
            ("free", f"I want to listen to {genre}{room_text}"),
            ("imp", f"play {genre} music{room_text}"),
            ("free", f"I'm in the mood for some {genre}{room_text}"),
            ("imp", f"start a {genre} playlist{room_text}"),
        ]
    kind, core = rng.choice(templates)
    out = {"intent": "play_music"}
    if song:
        out["song"] = song
    if artist:
        out["artist"] = artist
    if genre:
        out["genre"] = genre
    if room:
        out["room"] = room
    return finish(rng, core, kind), out


INTENTS = [
    ("book_table", gen_book_table),
    ("set_alarm", gen_set_alarm),
    ("send_money", gen_send_money),
    ("book_flight", gen_book_flight),
    ("order_food", gen_order_food),
    ("weather_query", gen_weather_query),
    ("create_reminder", gen_create_reminder),
    ("play_music", gen_play_music),
]

# Field order per intent (documented in the README; every output follows it), and the
# fields that every output of the intent has. play_music has at least one of song/artist/genre.
SCHEMAS = {
    "book_table": ["intent", "restaurant", "people", "day", "time"],
    "set_alarm": ["intent", "time", "days", "label"],
    "send_money": ["intent", "amount", "currency", "recipient", "note"],
    "book_flight": ["intent", "from", "to", "date", "passengers", "class"],
    "order_food": ["intent", "dish", "quantity", "size", "method"],
    "weather_query": ["intent", "city", "day", "unit"],
    "create_reminder": ["intent", "task", "day", "time"],
    "play_music": ["intent", "song", "artist", "genre", "room"],
}
REQUIRED = {
    "book_table": ["intent", "restaurant", "people"],
    "set_alarm": ["intent", "time"],
    "send_money": ["intent", "amount", "currency", "recipient"],
    "book_flight": ["intent", "from", "to"],
    "order_food": ["intent", "dish", "quantity"],
    "weather_query": ["intent", "city"],
    "create_reminder": ["intent", "task"],
    "play_music": ["intent"],
}

INSTRUCTIONS = [
    "Convert this request into a JSON object with its fields.",
    "Convert this request into a JSON object with its fields.",
    "Extract the intent and fields of this request as JSON.",
    "Turn the request into a compact JSON object.",
    "Parse the following request into JSON.",
    "Return the fields of this request as a JSON object.",
]


def gen_request(rng: random.Random, pick: Picker, gen, used: set[str]):
    """One (input, output_json) pair whose input is not in `used`, within the size limits."""
    while True:
        text, out = gen(rng, pick)
        out_s = dumps(out)
        if text in used:
            continue
        if len(text.split()) > MAX_INPUT_WORDS or len(out_s) >= MAX_OUTPUT_CHARS:
            continue
        used.add(text)
        return text, out_s


def build_requests(rng: random.Random):
    used: set[str] = set()
    splits = {}
    for split, n in (("train", N_TRAIN), ("eval", N_EVAL)):
        pick = Picker(rng, split)
        rows = []
        for i in range(n):
            _, gen = INTENTS[i % len(INTENTS)]
            text, out_s = gen_request(rng, pick, gen, used)
            rows.append({"instruction": rng.choice(INSTRUCTIONS), "input": text, "output": out_s})
        rng.shuffle(rows)
        splits[split] = rows
    return splits["train"], splits["eval"]


# ---------------------------------------------------------------------------
# Chat dataset: unit conversion, arithmetic, and request->JSON in chat form.
# ---------------------------------------------------------------------------

def num(x: float) -> str:
    """Round to 2 decimals; drop trailing zeros ("8.89", "10", "3.5")."""
    s = f"{round(x, 2):.2f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


# name, from-unit (sing, plural), to-unit (sing, plural), forward function, reverse function
CONVERSIONS = [
    ("km_mi", ("kilometre", "kilometres"), ("mile", "miles"), lambda x: x / 1.609344, lambda x: x * 1.609344),
    ("kg_lb", ("kilogram", "kilograms"), ("pound", "pounds"), lambda x: x * 2.20462262, lambda x: x / 2.20462262),
    ("c_f", ("degree Celsius", "degrees Celsius"), ("degree Fahrenheit", "degrees Fahrenheit"),
     lambda x: x * 9 / 5 + 32, lambda x: (x - 32) * 5 / 9),
    ("l_gal", ("litre", "litres"), ("US gallon", "US gallons"), lambda x: x / 3.785411784, lambda x: x * 3.785411784),
    ("in_cm", ("inch", "inches"), ("centimetre", "centimetres"), lambda x: x * 2.54, lambda x: x / 2.54),
    ("m_ft", ("metre", "metres"), ("foot", "feet"), lambda x: x / 0.3048, lambda x: x * 0.3048),
]


def unit_name(pair, x: float) -> str:
    return pair[0] if x == 1 else pair[1]


def conv_value(rng: random.Random, name: str) -> float:
    if name == "c_f":
        return float(rng.choice(range(-20, 41)))
    if rng.random() < 0.25:
        return rng.randint(1, 99) + rng.choice([0.5, 0.25, 0.75])
    return float(rng.randint(1, 250))


def conv_qa(rng: random.Random, conv, x: float, reverse: bool, follow_up: bool):
    name, a, b, fwd, rev = conv
    src, dst, f = (b, a, rev) if reverse else (a, b, fwd)
    y = f(x)
    xs = num(x)
    if follow_up:
        q = rng.choice([f"And {xs}?", f"What about {xs} {unit_name(src, x)}?", f"Now do {xs}."])
    else:
        q = rng.choice([
            f"How many {dst[1]} is {xs} {unit_name(src, x)}?",
            f"Convert {xs} {unit_name(src, x)} to {dst[1]}.",
            f"What is {xs} {unit_name(src, x)} in {dst[1]}?",
            f"{xs} {unit_name(src, x)} in {dst[1]}, please.",
            f"Can you convert {xs} {unit_name(src, x)} into {dst[1]}?",
        ])
    ans = f"{xs} {unit_name(src, x)} is {num(y)} {unit_name(dst, round(y, 2))}."
    return q, ans


def chat_units(rng: random.Random, turns: int):
    conv = rng.choice(CONVERSIONS)
    reverse = rng.random() < 0.4
    msgs = []
    for t in range(turns):
        x = conv_value(rng, conv[0])
        flip = t > 0 and rng.random() < 0.3
        if flip:
            reverse = not reverse
        q, a = conv_qa(rng, conv, x, reverse, follow_up=(t > 0 and not flip))
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    system = rng.choice([
        "You are a unit conversion assistant. Round results to two decimal places.",
        "You convert between metric and imperial units. Answer in one short sentence.",
        "You are a helpful assistant for unit conversions.",
    ])
    return system, msgs


OPS = {"+": "+", "-": "−", "*": "×", "/": "÷"}


def arith_first(rng: random.Random):
    op = rng.choice(["+", "-", "*", "/"])
    if op == "+":
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        r = a + b
    elif op == "-":
        a = rng.randint(50, 999)
        b = rng.randint(1, a - 1)
        r = a - b
    elif op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 30)
        r = a * b
    else:
        b, r = rng.randint(2, 25), rng.randint(2, 60)
        a = b * r
    word = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}[op]
    sym = {"+": "+", "-": "-", "*": "*", "/": "/"}[op]
    q = rng.choice([
        f"What is {a} {word} {b}?",
        f"What's {a} {sym} {b}?",
        f"Calculate {a} {word} {b}.",
        f"Compute {a} {sym} {b}.",
        f"{a} {sym} {b} = ?",
    ])
    return q, f"{a} {OPS[op]} {b} = {r}.", r


def arith_next(rng: random.Random, prev: int):
    choices = ["+", "-", "*"] if prev > 1 else ["+", "*"]  # results stay positive
    divisors = [d for d in range(2, 13) if prev % d == 0 and prev // d != 0]
    if divisors:
        choices.append("/")
    op = rng.choice(choices)
    if op == "+":
        b = rng.randint(1, 200)
        r = prev + b
        q = rng.choice([f"Now add {b} to that.", f"Add {b}.", f"And plus {b}?"])
    elif op == "-":
        b = rng.randint(1, min(200, prev - 1))
        r = prev - b
        q = rng.choice([f"Subtract {b} from that.", f"Now take away {b}.", f"And minus {b}?"])
    elif op == "*":
        b = rng.randint(2, 9)
        r = prev * b
        q = rng.choice([f"Multiply that by {b}.", f"Now times {b}.", f"And times {b}?"])
    else:
        b = rng.choice(divisors)
        r = prev // b
        q = rng.choice([f"Divide that by {b}.", f"Now divide by {b}.", f"And divided by {b}?"])
    return q, f"{prev} {OPS[op]} {b} = {r}.", r


def chat_arith(rng: random.Random, turns: int):
    q, a, r = arith_first(rng)
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for _ in range(turns - 1):
        q, a, r = arith_next(rng, r)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    system = rng.choice([
        "You are an arithmetic helper. Show the operation and the exact result.",
        "You are a calculator. Reply with the equation and its answer.",
        "Answer arithmetic questions exactly.",
    ])
    return system, msgs


def chat_json(rng: random.Random, turns: int, pick: Picker, used: set[str], with_system: bool):
    msgs = []
    for t in range(turns):
        _, gen = rng.choice(INTENTS)
        text, out_s = gen_request(rng, pick, gen, used)
        if t == 0 and not with_system:
            user = rng.choice(["Convert this request into JSON: ", "As a JSON object, please: ",
                               "Give me the JSON fields for this request: "]) + text
        elif t > 0:
            user = rng.choice(["", "And this one: ", "Next: ", "Now this: "]) + text
        else:
            user = text
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": out_s}]
    system = rng.choice([
        "Convert each user request into a compact JSON object with an intent and its fields.",
        "You turn requests into JSON. Reply with the JSON object only.",
    ])
    return system, msgs


def build_chat(rng: random.Random):
    used_inputs: set[str] = set()  # request texts used in chat JSON turns (kept disjoint across splits)
    seen_convs: set[str] = set()
    splits = {}
    for split, n in (("train", N_CHAT_TRAIN), ("eval", N_CHAT_EVAL)):
        pick = Picker(rng, split)
        rows = []
        i = 0
        while len(rows) < n:
            theme = ("units", "arith", "json")[i % 3]
            i += 1
            turns = rng.choice([1, 1, 1, 1, 2, 2, 2, 3, 3])
            with_system = rng.random() < 0.5
            if theme == "units":
                system, msgs = chat_units(rng, turns)
            elif theme == "arith":
                system, msgs = chat_arith(rng, turns)
            else:
                system, msgs = chat_json(rng, turns, pick, used_inputs, with_system)
            # Disjointness: neither the whole user side nor the first user message repeats.
            users = [m["content"] for m in msgs if m["role"] == "user"]
            key_all = "\x1f".join(users)
            key_first = "first:" + users[0]
            if key_all in seen_convs or key_first in seen_convs:
                continue
            seen_convs.add(key_all)
            seen_convs.add(key_first)
            if with_system:
                msgs = [{"role": "system", "content": system}] + msgs
            rows.append({"messages": msgs})
        rng.shuffle(rows)
        splits[split] = rows
    return splits["train"], splits["eval"]


# ---------------------------------------------------------------------------
# Deliberately malformed file for tests
# ---------------------------------------------------------------------------

BAD_LINES = {3: "missing the `output` key", 5: "`output` is a number (42), not a string",
             7: "invalid JSON (truncated object, unterminated string)"}


def build_bad(rng: random.Random):
    pick = Picker(rng, "train")
    used: set[str] = set()
    lines = []
    for lineno in range(1, 11):
        _, gen = INTENTS[(lineno - 1) % len(INTENTS)]
        text, out_s = gen_request(rng, pick, gen, used)
        row = {"instruction": INSTRUCTIONS[0], "input": text, "output": out_s}
        if lineno == 3:
            del row["output"]
            lines.append(dumps(row))
        elif lineno == 5:
            row["output"] = 42
            lines.append(dumps(row))
        elif lineno == 7:
            full = dumps(row)
            lines.append(full[: full.index('"output":') + len('"output":"{')])
        else:
            lines.append(dumps(row))
    return lines


# ---------------------------------------------------------------------------
# Row formats other tools use: plain text, ShareGPT, OpenAI messages with tools
# ---------------------------------------------------------------------------

N_FORMAT_ROWS = 40


def text_row(req) -> dict:
    return {"text": f"Request: {req['input']}\nJSON: {req['output']}"}


# Axolotl accepts both spellings; even rows use ShareGPT's, odd rows the chat ones.
SHAREGPT_FROM = [{"system": "system", "user": "human", "assistant": "gpt"},
                 {"system": "system", "user": "user", "assistant": "assistant"}]


def sharegpt_row(chat, k: int) -> dict:
    names = SHAREGPT_FROM[k % 2]
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in chat["messages"]]}


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current temperature in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}


def tools_row(rng: random.Random, k: int) -> dict:
    city = CITIES["train"][(k * 7) % len(CITIES["train"])]
    unit = "celsius" if k % 3 else "fahrenheit"
    temp = rng.randint(-5, 35) if unit == "celsius" else rng.randint(25, 95)
    call_id = f"call_{k:03d}"
    sign = "°C" if unit == "celsius" else "°F"
    msgs = [
        {"role": "user", "content": f"How warm is it in {city} right now?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": city, "unit": unit}}}]},
        {"role": "tool", "tool_call_id": call_id, "content": dumps({"temperature": temp, "unit": unit})},
        {"role": "assistant", "content": f"It is {temp} {sign} in {city}."},
    ]
    return {"messages": msgs, "tools": [WEATHER_TOOL]}


# line -> (row or raw text, what is wrong); lines not listed are good rows.
def build_format_bad(req_train, chat_train, rng: random.Random):
    text = [dumps(text_row(r)) for r in req_train[:6]]
    text[1] = dumps({"content": req_train[1]["input"]})
    text[3] = dumps({"text": 7})
    share = [dumps(sharegpt_row(c, k)) for k, c in enumerate(chat_train[:6])]
    bad = sharegpt_row(chat_train[1], 1)
    bad["conversations"][0]["from"] = "bot"
    share[1] = dumps(bad)
    bad = sharegpt_row(chat_train[3], 3)
    del bad["conversations"][-1]["value"]
    share[3] = dumps(bad)
    share[4] = dumps({"conversations": [{"from": "human", "value": "Hello?"}]})
    tools = [tools_row(rng, k) for k in range(5)]
    del tools[1]["messages"][1]["tool_calls"][0]["function"]["name"]
    tools[2]["messages"][2]["role"] = "function"
    tools[3]["messages"][0]["tool_calls"] = tools[3]["messages"][1]["tool_calls"]
    return {
        "bad/text-bad.jsonl": "".join(line + "\n" for line in text),
        "bad/sharegpt-bad.jsonl": "".join(line + "\n" for line in share),
        "bad/tools-bad.jsonl": "".join(dumps(r) + "\n" for r in tools),
    }


FORMAT_BAD = {
    "bad/text-bad.jsonl": {2: "no `text` field (`content` instead)", 4: "`text` is a number"},
    "bad/sharegpt-bad.jsonl": {2: "`conversations[0].from` is \"bot\"", 4: "the last turn has no `value`",
                               5: "no `gpt` turn to train on"},
    "bad/tools-bad.jsonl": {2: "`messages[1].tool_calls[0].function` has no `name`",
                            3: "`messages[2].role` is \"function\"", 4: "`messages[0]` (user) has `tool_calls`"},
}


# ---------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------

def intent_counts(rows):
    counts = {name: 0 for name, _ in INTENTS}
    for r in rows:
        counts[json.loads(r["output"])["intent"]] += 1
    return counts


def build_readme(req_train, req_eval, chat_train, chat_eval) -> str:
    ct, ce = intent_counts(req_train), intent_counts(req_eval)
    def keys(name):
        return ", ".join(f"`{k}`" if k in REQUIRED[name] else f"`{k}`?" for k in SCHEMAS[name])

    intent_rows = "\n".join(f"| `{name}` | {keys(name)} | {ct[name]} | {ce[name]} |" for name, _ in INTENTS)

    def turn_stats(rows):
        multi = sum(1 for r in rows if sum(m["role"] == "user" for m in r["messages"]) > 1)
        sys_n = sum(1 for r in rows if r["messages"][0]["role"] == "system")
        return multi, sys_n

    mt, st = turn_stats(chat_train)
    me, se = turn_stats(chat_eval)
    bad = "\n".join(f"| {n} | {why} |" for n, why in sorted(BAD_LINES.items()))
    format_bad = "\n".join(f"- `{f}`: " + "; ".join(f"line {n}: {why}" for n, why in sorted(lines.items()))
                           for f, lines in FORMAT_BAD.items())
    return f"""# Datasets

Small synthetic datasets for tuner's examples and tests. Every file here is generated by
`scripts/gen_datasets.py` (Python 3.11, standard library only, fixed seed `{SEED}`), so do not
edit them by hand: change the script and run

```sh
python3 scripts/gen_datasets.py          # rewrite datasets/
python3 scripts/gen_datasets.py --check  # exit 1 if the committed files differ from a fresh run
```

Two runs produce byte-identical files. All files are UTF-8 JSON Lines: one compact JSON object
per line (`separators=(",", ":")`, non-ASCII characters kept as is), `\\n` line ends, a final newline.

## Files

| File | Rows | Format |
|---|---:|---|
| `requests-json/train.jsonl` | {len(req_train)} | Alpaca (`instruction`, `input`, `output`) |
| `requests-json/eval.jsonl` | {len(req_eval)} | Alpaca (`instruction`, `input`, `output`) |
| `chat/train.jsonl` | {len(chat_train)} | chat (`messages`) |
| `chat/eval.jsonl` | {len(chat_eval)} | chat (`messages`) |
| `bad/requests-bad.jsonl` | 10 | Alpaca, lines 3, 5 and 7 deliberately malformed |
| `formats/text.jsonl`, `formats/text.jsonl.gz` | {N_FORMAT_ROWS} | plain text (`text`): "Request: …\\nJSON: …" from the first requests-json rows |
| `formats/sharegpt.jsonl` | {N_FORMAT_ROWS} | ShareGPT (`conversations` of `from`/`value`): the first chat rows; even rows say `human`/`gpt`, odd rows `user`/`assistant` |
| `formats/tools.jsonl` | 12 | OpenAI chat with a row-level `tools` list, an assistant `tool_calls` turn (`get_weather`), a `tool` reply and the answer |
| `bad/text-bad.jsonl`, `bad/sharegpt-bad.jsonl`, `bad/tools-bad.jsonl` | 6, 6, 5 | as above, with malformed lines (below) |

## requests-json: plain-English request → JSON object

Each row is `{{"instruction": ..., "input": ..., "output": ...}}` with keys in that order.

- `instruction`: one of {len(dict.fromkeys(INSTRUCTIONS))} short variants, e.g. "{INSTRUCTIONS[0]}"
- `input`: the request in plain English, about 3–30 words (phrasings vary: several sentence
  templates per intent, optional politeness, number words or digits, 12 h or 24 h times, ...).
- `output`: a string holding a compact JSON object (`json.dumps(obj, separators=(",", ":"),
  ensure_ascii=False)`), always shorter than {MAX_OUTPUT_CHARS} characters. Its first key is `intent`; the
  other keys follow the fixed per-intent order below.

| intent | keys, in order (`?` = optional) | train | eval |
|---|---|---:|---:|
{intent_rows}

Normalisation rules (the answers are checkable):

- **Optional fields that the text does not mention are omitted** (never `null`); fields without
  `?` are always present. `play_music` has at least one of `song`, `artist`, `genre`.
- `time`: 24-hour `"HH:MM"` (`"7pm"` → `"19:00"`, `"quarter to eight in the evening"` → `"19:45"`,
  `"noon"` → `"12:00"`, `"midnight"` → `"00:00"`).
- `day`: `"today"` (also "tonight", "right now", "this afternoon"), `"tomorrow"`, a lower-case
  weekday (`"friday"`), or for `weather_query` also `"weekend"`.
- `days` (`set_alarm`): list of three-letter lower-case days in calendar order, e.g.
  `["mon","wed","fri"]`; "every day" → all seven, "weekdays" → `mon`…`fri`, "weekends" → `sat`,`sun`.
- `date` (`book_flight`): `"MM-DD"` (no year), e.g. "the 3rd of March" → `"03-03"`.
- Counts (`people`, `passengers`, `quantity`) are JSON integers, written as digits or words in the
  text ("four people" → `4`; "a"/"an"/"one" → `1`).
- `amount`: JSON number (`"$12.50"` → `12.5`, `"twenty-five dollars"` → `25`, `"1,200 yen"` → `1200`);
  `currency`: ISO 4217 code (`$`/dollars/bucks → `USD`, `€`/euros → `EUR`, `£`/pounds/quid → `GBP`,
  `¥`/yen → `JPY`, Canadian dollars/`CA$` → `CAD`, Swiss francs/`CHF` → `CHF`).
- `class`: `economy` (also "coach"), `premium_economy`, `business`, `first`.
- `size`: `small`/`medium`/`large`; `method`: `delivery` or `pickup` (also "collection").
- `unit`: `celsius` or `fahrenheit`.
- `dish` is the singular form ("two cheeseburgers" → `"cheeseburger"`, `2`). Other strings
  (`restaurant`, `recipient`, `city`, `task`, `label`, `note`, `song`, `artist`, `genre`, `room`)
  are copied from the text as written, without surrounding quotes; `note` drops the leading "for".

Train/eval separation: no `input` text occurs twice in the two files together. Each entity list
(restaurants, names, cities, songs, artists, genres, rooms, dishes, tasks, alarm labels, payment
notes) has a held-out part that only eval rows use; about {int(HELD_OUT_P * 100)}% of eval entity draws come from
it, so memorising training rows is not enough. Intents are exactly balanced
({N_TRAIN // len(INTENTS)} train and {N_EVAL // len(INTENTS)} eval rows each), then rows are shuffled.

## chat: short multi-turn conversations

Each row is `{{"messages": [{{"role": ..., "content": ...}}, ...]}}`: an optional leading `system`
message, then alternating `user` / `assistant` messages, always ending with `assistant`.
1 to 3 user turns per row. Train: {len(chat_train)} rows ({mt} multi-turn, {st} with a system
message). Eval: {len(chat_eval)} rows ({me} multi-turn, {se} with a system message).

Three themes in equal shares, all with checkable answers:

- **Unit conversion** (km↔miles, kg↔pounds, °C↔°F, litres↔US gallons, inches↔cm, metres↔feet):
  answers like "12 kilometres is 7.46 miles.", rounded to 2 decimals with trailing zeros dropped.
  Follow-ups ("And 20?") repeat the conversion or reverse it.
- **Arithmetic** (`+ − × ÷`, positive integer results): "What is 47 times 12?" → "47 × 12 = 564.";
  follow-ups ("Now add 25 to that.") operate on the previous result.
- **Request → JSON**: the requests-json task in chat form; assistant replies are the JSON object
  only, following the same rules as above. Without a system message the first user turn starts
  with a short instruction ("Convert this request into JSON: ...").

Questions write operators as ASCII (`-`, `*`, `/`) or words; answers use `+ − × ÷` (U+2212,
U+00D7, U+00F7).

No conversation repeats, and no first user message is shared between train and eval; eval JSON
turns use held-out entities as above.

## bad/requests-bad.jsonl: malformed rows for loader tests

10 lines in Alpaca format. All lines are valid rows except these (line numbers are 1-based):

| line | problem |
|---:|---|
{bad}

The malformed lines of the other formats:

{format_bad}

## License

Apache-2.0, the same as the project. All content is synthetic, written for this project by
`scripts/gen_datasets.py`; entity names (restaurants, artists, songs, people) are made up.
"""


# ---------------------------------------------------------------------------

def render_jsonl(rows) -> bytes:
    return "".join(dumps(r) + "\n" for r in rows).encode("utf-8")


def build_all() -> dict[str, bytes]:
    req_train, req_eval = build_requests(random.Random(SEED))
    chat_train, chat_eval = build_chat(random.Random(SEED + 1))
    bad_lines = build_bad(random.Random(SEED + 2))
    text = render_jsonl([text_row(r) for r in req_train[:N_FORMAT_ROWS]])
    tools_rng = random.Random(SEED + 3)
    tools = render_jsonl([tools_row(tools_rng, k) for k in range(12)])
    format_bad = build_format_bad(req_train, chat_train, random.Random(SEED + 4))
    return {
        "formats/text.jsonl": text,
        "formats/text.jsonl.gz": gzip.compress(text, compresslevel=9, mtime=0),
        "formats/sharegpt.jsonl": render_jsonl([sharegpt_row(c, k) for k, c in enumerate(chat_train[:N_FORMAT_ROWS])]),
        "formats/tools.jsonl": tools,
        **{name: body.encode("utf-8") for name, body in format_bad.items()},
        "requests-json/train.jsonl": render_jsonl(req_train),
        "requests-json/eval.jsonl": render_jsonl(req_eval),
        "chat/train.jsonl": render_jsonl(chat_train),
        "chat/eval.jsonl": render_jsonl(chat_eval),
        "bad/requests-bad.jsonl": "".join(line + "\n" for line in bad_lines).encode("utf-8"),
        "README.md": build_readme(req_train, req_eval, chat_train, chat_eval).encode("utf-8"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="regenerate in memory and exit 1 if any file under datasets/ differs")
    args = ap.parse_args()
    files = build_all()
    if args.check:
        stale = []
        for rel, data in files.items():
            path = OUT_DIR / rel
            if not path.is_file():
                stale.append(rel)
            elif rel.endswith(".gz"):
                # The compressed bytes may differ between zlib builds; the text must not.
                if gzip.decompress(path.read_bytes()) != gzip.decompress(data):
                    stale.append(rel)
            elif path.read_bytes() != data:
                stale.append(rel)
        if stale:
            for rel in stale:
                print(f"gen_datasets: datasets/{rel} is missing or out of date", file=sys.stderr)
            print("gen_datasets: run `python3 scripts/gen_datasets.py` to regenerate", file=sys.stderr)
            return 1
        print(f"gen_datasets: {len(files)} files up to date")
        return 0
    for rel, data in files.items():
        path = OUT_DIR / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote datasets/{rel} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
