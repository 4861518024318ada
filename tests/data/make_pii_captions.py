"""Generate tests/data/pii_captions.jsonl: a labelled caption set for the text de-identifier.

Run from the repo root: ``python tests/data/make_pii_captions.py``. The output is a pure
function of the fixed seed and the lists below (see README.md beside this file).

Each line is ``{"id": str, "text": str, "clean": bool, "entities": [{"start", "end",
"type"}]}`` with character offsets into ``text``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261121
OUT = Path(__file__).with_name("pii_captions.jsonl")

# Full names written by hand from many origins (given name, family name). Written before the
# name finder was tuned and not drawn from its gazetteer; some given names are deliberately
# rare or absent there (Igbo, Yoruba, Akan, Zulu, Maori, Korean, Thai names).
NAMES: list[tuple[str, str]] = [
    ("Emily", "Carter"),
    ("James", "O'Connor"),
    ("Olivia", "Bennett"),
    ("Michael", "Thompson"),
    ("Siobhan", "Murphy"),
    ("Niamh", "Gallagher"),
    ("Cillian", "Byrne"),
    ("Mateo", "Hernández"),
    ("Valentina", "Rojas"),
    ("Joaquín", "Morales"),
    ("Camila", "Fuentes"),
    ("Ximena", "Castillo"),
    ("João", "Pereira"),
    ("Thiago", "Carvalho"),
    ("Luana", "Ferreira"),
    ("Amélie", "Dubois"),
    ("Théo", "Lefèvre"),
    ("Camille", "Rousseau"),
    ("Lukas", "Schneider"),
    ("Anneke", "Visser"),
    ("Sven", "Lindqvist"),
    ("Ingrid", "Haugen"),
    ("Björn", "Eriksson"),
    ("Freya", "Nielsen"),
    ("Giulia", "Romano"),
    ("Lorenzo", "Bianchi"),
    ("Agnieszka", "Kowalczyk"),
    ("Bartosz", "Wiśniewski"),
    ("Dmitri", "Volkov"),
    ("Oksana", "Shevchenko"),
    ("Tereza", "Novotná"),
    ("Eleni", "Papadopoulou"),
    ("Mehmet", "Y\u0131lmaz"),
    ("Elif", "Demir"),
    ("Fatima", "Al-Sayed"),
    ("Omar", "Haddad"),
    ("Youssef", "Benali"),
    ("Layla", "Nasser"),
    ("Dariush", "Rahimi"),
    ("Shirin", "Tehrani"),
    ("Noa", "Levi"),
    ("Avi", "Cohen"),
    ("Priya", "Raghunathan"),
    ("Arjun", "Mehta"),
    ("Ananya", "Iyer"),
    ("Farhan", "Chowdhury"),
    ("Nimali", "Perera"),
    ("Harpreet", "Kaur"),
    ("Wei", "Zhang"),
    ("Mei", "Chen"),
    ("Jun", "Wang"),
    ("Xiaoling", "Liu"),
    ("Haruto", "Sato"),
    ("Yuki", "Tanaka"),
    ("Aiko", "Nakamura"),
    ("Min-jun", "Kim"),
    ("Seo-yeon", "Park"),
    ("Ji-woo", "Lee"),
    ("Linh", "Pham"),
    ("Minh", "Tran"),
    ("Somchai", "Srisuk"),
    ("Paolo", "Reyes"),
    ("Maria", "Santos"),
    ("Chukwuemeka", "Okafor"),
    ("Ngozi", "Adeyemi"),
    ("Oluwaseun", "Bankole"),
    ("Kwame", "Mensah"),
    ("Abena", "Owusu"),
    ("Thabo", "Nkosi"),
    ("Nomvula", "Dlamini"),
    ("Amara", "Diallo"),
    ("Wanjiru", "Kamau"),
    ("Tesfaye", "Bekele"),
    ("Aisha", "Bello"),
    ("Aroha", "Ngata"),
    ("Wiremu", "Tane"),
    ("Sione", "Taufa"),
    ("DeShawn", "Jackson"),
    ("Latoya", "Williams"),
    ("Imani", "Brooks"),
    ("Jamal", "Washington"),
    ("Xochitl", "Ramírez"),
    ("Itzel", "Cruz"),
    ("Zsófia", "Nagy"),
    ("János", "Kovács"),
    ("Grace", "Hopper"),
    ("Will", "Turner"),
    ("Rose", "Mwangi"),
]

# Captions with personal data: {P} is a full name, {F} a given name, {L} a family name.
NAME_TEMPLATES = [
    "{P} smiling at the camera.",
    "Portrait of {P} at the beach.",
    "{F} and her dog in the park.",
    "Dr. {L} examining an X-ray on a lightbox.",
    "Photo of the team taken by {P}.",
    "{P} holding a birthday cake with six candles.",
    "My friend {F} on a hike in the mountains.",
    "Patient {P}, chest X-ray, frontal view.",
    "Ms. {L} presenting at the conference.",
    "A child named {F} playing football.",
    "{F}'s new bicycle leaning on a fence.",
    "Selfie with {F} in front of the museum.",
    "Mr. {P} at his desk.",
    "Wedding of {P} and {P2}.",
    "{F} laughing with friends at dinner.",
    "Grandmother {F} knitting by the window.",
    "Nurse {P} adjusting a drip.",
    "Close-up of {F} wearing a red scarf.",
]

# Clean captions: no personal data, many capitalised words that are not names.
CLEAN_CAPTIONS = [
    "A dog running in the park on Monday.",
    "Tourists in front of the Eiffel Tower in Paris.",
    "A pair of Nike sneakers on a wooden floor.",
    "Sunset over the Golden Gate Bridge.",
    "Christmas lights in downtown Chicago.",
    "Street market in Lagos on a Saturday morning.",
    "The Amazon river seen from above.",
    "Cherry blossoms in Tokyo in April.",
    "A plate of sushi on a black table.",
    "Two cats sleeping on a sofa.",
    "Chest X-ray, frontal view, no acute findings.",
    "MRI of the left knee, sagittal plane.",
    "Version 2.3.1 of the app on a phone screen.",
    "A red Toyota parked on Main Street.",
    "Crowd at the Boston Marathon.",
    "A bowl of ramen for $12.",
    "Room 204 of the Grand Hotel.",
    "The Sydney Opera House at night.",
    "Snow on Mount Fuji in January.",
    "Florence cathedral at dawn.",
    "The Jordan River at sunset.",
    "Victoria Station at rush hour.",
    "Georgia peaches at a farm stand.",
    "Austin skyline in summer.",
    "Apple laptop on a desk next to a coffee mug.",
    "Happy New Year banner over a street.",
    "A Canon camera on a tripod.",
    "Players of Real Madrid celebrating a goal.",
    "Hong Kong harbour at night.",
    "Street art in Buenos Aires.",
    "Los Angeles traffic at 5 pm.",
    "Big Ben under a grey sky.",
    "A Mercedes at the Geneva Motor Show.",
    "Young woman reading a book on a bench.",
    "Old man feeding pigeons in Trafalgar Square.",
    "Kids playing in the snow on Sunday afternoon.",
    "Fireworks over the river on Independence Day.",
    "A Samsung phone showing 42% battery.",
    "Coffee at Starbucks on a rainy Tuesday.",
    "The Great Wall of China in autumn.",
    "CT scan of the abdomen, axial slice 34 of 120.",
    "Ultrasound, 12 weeks, transverse view.",
    "A Lego castle with 1200 pieces.",
    "Shelf of Harry Potter books in a library.",
    "Hikers on the Appalachian Trail in October.",
    "Mount Kilimanjaro above the clouds.",
    "A McDonald's sign at night.",
    "Stained glass in Notre-Dame.",
    "Rice fields in Bali after the rain.",
    "A Boeing 747 taking off at dawn.",
    "Easter eggs painted in bright colours.",
    "Camels near the pyramids of Giza.",
    "A Ferrari on the track at Monza.",
    "Bookshop in Dublin with a green door.",
    "Train from Berlin to Munich at the platform.",
    "Cyclists in Amsterdam crossing a canal.",
    "Lanterns at a festival in Hanoi.",
    "Spring flowers in Kew Gardens.",
    "Thanksgiving dinner table with a turkey.",
    "Fresh bread at a bakery in Lyon.",
    "Pepsi and Coca-Cola cans on a counter.",
    "Taxi queue outside JFK airport.",
    "Skyline of Dubai with the Burj Khalifa.",
    "A Tesla charging in a parking garage.",
    "Autumn leaves in Central Park.",
    "Desert road in Arizona at noon.",
    "Lighthouse on the coast of Maine.",
    "Monks walking in Kyoto.",
    "Snowboarder in the Alps.",
    "Carnival dancers in Rio.",
    "Left hand X-ray, PA view, healed fracture of the fifth metacarpal.",
    "Dermoscopy image of a benign nevus, 10x magnification.",
    "A bag of IKEA furniture parts on the floor.",
    "Adidas football on green grass.",
    "Times Square billboards at 11 pm.",
    "Grandfather clock in a hallway.",
    "Queen of hearts playing card on a table.",
    "A Honda motorbike in the rain.",
    "Chapter 3, page 27 of a cookbook.",
    "The Thames at low tide.",
    "Gondolas in Venice on a cloudy day.",
    "Polar bear at the Toronto Zoo.",
    "A Sony television in a living room.",
    "Wheat field in Kansas in July.",
    "Flag of Brazil waving in the wind.",
    "Bridge over the Danube in Budapest.",
    "A glass of Guinness on a bar.",
    "The Louvre pyramid at dusk.",
    "Marathon runners passing mile 20.",
    "Sea turtles near the Great Barrier Reef.",
    "Pizza Margherita straight from the oven.",
    "Ice hockey game in Montreal.",
    "A Nikon lens on a white background.",
    "Library reading room at Oxford.",
    "Boats in Cape Town harbour.",
    "Sahara dunes in the late afternoon.",
    "Tulips in the Netherlands in May.",
    "Monday morning commute on the subway.",
    "Yoga class in a studio on Friday.",
    "Microsoft logo on a glass building.",
]

EMAIL_DOMAINS = ["example.com", "mail.example.org", "clinic.example.net", "example.co.uk"]
US_AREA_CODES = ["212", "415", "617", "312", "206", "303", "512", "305", "404", "718"]


def _ascii(s: str) -> str:
    import unicodedata

    decomposed = unicodedata.normalize("NFKD", s)
    return "".join(c for c in decomposed if c.isascii() and c.isalnum()).lower()


def make_email(rng: random.Random) -> str:
    first, last = rng.choice(NAMES)
    style = rng.randrange(3)
    local = {
        0: f"{_ascii(first)}.{_ascii(last)}",
        1: f"{_ascii(first)[0]}{_ascii(last)}{rng.randrange(10, 99)}",
        2: f"{_ascii(first)}+photos",
    }[style]
    return f"{local}@{rng.choice(EMAIL_DOMAINS)}"


def make_phone(rng: random.Random) -> str:
    area = rng.choice(US_AREA_CODES)
    exchange = f"{rng.randrange(2, 10)}{rng.randrange(10)}{rng.randrange(10)}"
    line = f"{rng.randrange(10000):04d}"
    styles = [
        f"({area}) {exchange}-{line}",
        f"{area}-{exchange}-{line}",
        f"+1 {area} {exchange} {line}",
        f"{area}.{exchange}.{line}",
        f"+44 20 7{rng.randrange(100, 1000)} {rng.randrange(1000, 10000)}",
        f"+44 7911 {rng.randrange(100000, 1000000)}",
        f"+49 30 {rng.randrange(10000000, 100000000)}",
        f"+33 6 {rng.randrange(10, 100)} {rng.randrange(10, 100)} {rng.randrange(10, 100)} "
        f"{rng.randrange(10, 100)}",
        f"+91 98{rng.randrange(100, 1000)} {rng.randrange(10000, 100000)}",
    ]
    return rng.choice(styles)


def _luhn_check_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def make_card(rng: random.Random) -> str:
    prefix, length = rng.choice(
        [("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15), ("6011", 16)]
    )
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    number = body + _luhn_check_digit(body)
    sep = rng.choice([" ", "-", ""])
    if length == 15:
        groups = [number[:4], number[4:10], number[10:]]
    else:
        groups = [number[i : i + 4] for i in range(0, 16, 4)]
    return sep.join(groups)


def make_ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    sep = rng.choice(["-", "-", " "])
    return f"{area:03d}{sep}{rng.randrange(1, 100):02d}{sep}{rng.randrange(1, 10000):04d}"


def make_ip(rng: random.Random) -> str:
    if rng.random() < 0.2:
        groups = [f"{rng.randrange(0x10000):x}" for _ in range(4)]
        return "2001:db8:" + ":".join(groups[:2]) + "::" + ":".join(groups[2:])
    first = rng.choice([10, 172, 192, 8, 81, 203])
    return ".".join(str(x) for x in [first] + [rng.randrange(256) for _ in range(3)])


def make_url(rng: random.Random) -> str:
    first, last = rng.choice(NAMES)
    return rng.choice(
        [
            f"https://www.example.com/users/{_ascii(first)}{_ascii(last)}",
            f"http://portal.clinic.example.org/record?id={rng.randrange(10**6)}",
            f"www.{_ascii(first)}{_ascii(last)}.com",
            f"https://photos.example.net/album/{rng.randrange(10**4)}/img_{rng.randrange(999)}.jpg",
        ]
    )


MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def make_date(rng: random.Random) -> str:
    year, month, day = rng.randrange(1940, 2026), rng.randrange(1, 13), rng.randrange(1, 29)
    name = MONTHS[month - 1]
    return rng.choice(
        [
            f"{year}-{month:02d}-{day:02d}",
            f"{day:02d}/{month:02d}/{year}",
            f"{month}/{day}/{year}",
            f"{name} {day}, {year}",
            f"{day} {name} {year}",
            f"{name[:3]}. {day}, {year}",
            f"{day}.{month:02d}.{year}",
            f"{name} {day}",
        ]
    )


PATTERN_TEMPLATES = {
    "EMAIL": [
        "Send the full-resolution copy to {v}.",
        "Photo shared by {v} on the team drive.",
        "Contact: {v}",
    ],
    "PHONE": [
        "Call {v} to book a follow-up scan.",
        "Owner's number {v} written on the collar tag.",
        "Shop sign with the phone number {v}.",
    ],
    "PAYMENT_CARD": [
        "Receipt paid with card {v} at the cafe.",
        "Card number {v} visible on the table.",
        "Screenshot of a payment form with {v} filled in.",
    ],
    "US_SSN": [
        "Form with SSN {v} in the top corner.",
        "Scanned ID card, social security number {v}.",
        "Insurance claim for member {v}, knee X-ray.",
    ],
    "IP_ADDRESS": [
        "Camera feed from {v} at the entrance.",
        "Router admin page at {v} on a laptop.",
        "Screenshot of server logs from {v}.",
    ],
    "URL": [
        "Original image from {v}.",
        "Poster advertising {v} on a wall.",
        "Downloaded from {v} last week.",
    ],
    "DATE": [
        "Birthday party on {v} in the garden.",
        "Admission date {v}, chest X-ray, frontal.",
        "Taken on {v} at the family reunion.",
    ],
}

MAKERS = {
    "EMAIL": make_email,
    "PHONE": make_phone,
    "PAYMENT_CARD": make_card,
    "US_SSN": make_ssn,
    "IP_ADDRESS": make_ip,
    "URL": make_url,
    "DATE": make_date,
}


def fill(template: str, values: dict[str, tuple[str, str]]) -> tuple[str, list[dict]]:
    """Fill ``template``'s {KEY} slots; values map KEY -> (text, type). Returns text, spans."""
    text, entities, pos = "", [], 0
    while True:
        start = template.find("{", pos)
        if start < 0:
            return text + template[pos:], entities
        end = template.index("}", start)
        text += template[pos:start]
        value, kind = values[template[start + 1 : end]]
        entities.append({"start": len(text), "end": len(text) + len(value), "type": kind})
        text += value
        pos = end + 1


def generate(rng: random.Random) -> list[dict]:
    records: list[dict] = []
    for kind, templates in PATTERN_TEMPLATES.items():
        for i in range(60):
            text, ents = fill(templates[i % len(templates)], {"v": (MAKERS[kind](rng), kind)})
            records.append({"id": f"{kind.lower()}-{i:03d}", "text": text, "entities": ents})
    for i in range(150):
        (first, last), (first2, last2) = rng.sample(NAMES, 2)
        template = NAME_TEMPLATES[i % len(NAME_TEMPLATES)]
        values = {
            "P": (f"{first} {last}", "PERSON"),
            "P2": (f"{first2} {last2}", "PERSON"),
            "F": (first, "PERSON"),
            "L": (last, "PERSON"),
        }
        text, ents = fill(template, values)
        records.append({"id": f"person-{i:03d}", "text": text, "entities": ents})
    for i in range(40):
        (first, last) = rng.choice(NAMES)
        template = rng.choice(
            [
                "{P} sent this from {E}, call {T}.",
                "Visit on {D}: {P}, phone {T}.",
                "{P} ({E}) uploaded this on {D}.",
            ]
        )
        values = {
            "P": (f"{first} {last}", "PERSON"),
            "E": (make_email(rng), "EMAIL"),
            "T": (make_phone(rng), "PHONE"),
            "D": (make_date(rng), "DATE"),
        }
        text, ents = fill(template, values)
        records.append({"id": f"mixed-{i:03d}", "text": text, "entities": ents})
    for i, caption in enumerate(CLEAN_CAPTIONS):
        records.append({"id": f"clean-{i:03d}", "text": caption, "entities": []})
    for record in records:
        record["clean"] = not record["entities"]
    return records


def main() -> None:
    records = generate(random.Random(SEED))
    with OUT.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} captions to {OUT}")


if __name__ == "__main__":
    main()
