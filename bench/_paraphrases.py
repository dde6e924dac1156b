"""Paraphrase pairs for ``aiwfe bench embed``: a memory and a query asking for it that share
no word (case-insensitive; :func:`shared_words` checks), plus distractor memories."""

from __future__ import annotations

import re

__all__ = ["DISTRACTORS", "PAIRS", "shared_words"]

PAIRS: list[tuple[str, str]] = [
    (
        "The car would not start this morning because the battery was dead.",
        "My vehicle failed to turn on today; its accumulator had no charge.",
    ),
    ("I moved to Berlin last spring for a new job.", "When did you relocate into Germany's capital, seeking employment?"),
    ("My daughter is allergic to peanuts.", "Which foods must our child avoid?"),
    ("The quarterly revenue grew by twelve percent.", "How much did sales increase over three months?"),
    ("Our cat sleeps on the sofa all afternoon.", "Where does my kitten nap during daytime?"),
    ("The flight to Tokyo was delayed by four hours.", "Did our plane into Japan arrive late?"),
    ("I prefer tea over coffee in the morning.", "Which hot drink do you like at breakfast?"),
    ("The database server ran out of disk space overnight.", "Why did storage fill up on that SQL machine yesterday evening?"),
    ("She plays the violin in an orchestra.", "Does my sister perform music with a symphony?"),
    ("We adopted a puppy from the animal shelter.", "Did they get one young dog out of some rescue?"),
    ("The doctor prescribed antibiotics for my infection.", "What medicine did a physician give me when I was sick?"),
    ("My password expires every ninety days.", "How often must I change login credentials?"),
    ("The restaurant downtown serves excellent sushi.", "Where can someone eat good raw fish in town centre?"),
    ("He broke his leg while skiing in the Alps.", "How was that bone fractured on mountain slopes?"),
    ("The meeting with the investors was moved to Friday.", "When do we now talk alongside funders?"),
    ("Our office printer keeps jamming paper.", "Why does that copier at work get stuck?"),
    ("I forgot my umbrella and got soaked in the rain.", "Did you get wet during a storm without protection?"),
    ("The children built a sandcastle at the beach.", "What did kids make by seaside?"),
    ("My grandmother taught me how to bake bread.", "Who showed you baking loaves as a kid?"),
    (
        "The website crashed when thousands of users logged in at once.",
        "Why did our web page go down under heavy simultaneous traffic?",
    ),
    ("We are saving money to buy a house next year.", "Is your family putting aside funds for purchasing property soon?"),
    ("The train to Paris leaves at seven.", "What time does a railway departure toward France happen?"),
    ("I started running every evening to lose weight.", "Do you jog nightly for slimming down?"),
    ("The invoice was paid two weeks late.", "Did that bill get settled after its due date?"),
    ("Our team won the football championship.", "Did my squad take a soccer title?"),
    ("The heating broke and the apartment was freezing.", "Why is your flat so cold?"),
    (
        "She is learning Spanish before her trip to Mexico.",
        "Which language does my friend study ahead of visiting Latin America?",
    ),
    ("The garden tomatoes are finally ripe.", "Can we pick vegetables from our yard now?"),
    ("My laptop screen cracked when I dropped it.", "How did that notebook display get damaged?"),
    ("We celebrated our wedding anniversary at a lake cabin.", "Where did you mark one marriage milestone?"),
]

DISTRACTORS: list[str] = [
    "The library closes at nine on weekdays.",
    "He repainted the fence white last weekend.",
    "Our neighbours have three noisy parrots.",
    "The museum opened a new dinosaur exhibit.",
    "I need to renew my passport before July.",
    "The bakery on the corner sells croissants.",
    "My brother collects vintage postage stamps.",
    "The bridge was closed for repairs all summer.",
    "She knitted a scarf for her nephew.",
    "The concert tickets sold out in minutes.",
    "A new bus line connects the airport and the station.",
    "The school introduced a chess club.",
    "Our landlord raised the rent by fifty euros.",
    "He writes poems in a small notebook.",
    "The river flooded the lower fields in April.",
    "I replaced the kitchen faucet myself.",
    "The startup hired its first designer.",
    "My phone contract ends in December.",
    "The festival featured jazz bands from Brazil.",
    "We planted an apple tree behind the shed.",
    "The API returns JSON with a cursor for pagination.",
    "Unit tests run on every pull request.",
    "The cluster autoscaler adds nodes under load.",
    "The log files rotate daily and keep two weeks.",
    "A cron job backs up the photos every Sunday.",
    "The warehouse counts inventory each quarter.",
    "Our dentist appointment is on Tuesday.",
    "The hotel offers free breakfast and parking.",
    "The old piano needs tuning.",
    "The marathon route passes the cathedral.",
]

_WORD = re.compile(r"[a-z0-9]+")


def shared_words(a: str, b: str) -> set[str]:
    """The words (lower-cased alphanumeric runs) that ``a`` and ``b`` have in common."""
    return set(_WORD.findall(a.lower())) & set(_WORD.findall(b.lower()))
