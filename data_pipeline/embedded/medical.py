"""A patient describes symptoms; the answer names a likely cause and gives advice (mirrors iCliniq).

The advice text is template-made for a learning exercise and is not medical guidance.
"""

from __future__ import annotations

import random

INSTRUCTION = "If you are a doctor, please answer the medical questions based on the patient's description."

# condition -> (symptoms, advice, warning signs)
CONDITIONS = {
    "a common cold": (
        ["a runny nose", "a sore throat", "sneezing", "a mild cough"],
        "rest, drink plenty of fluids and use saline nasal spray",
        "a fever above 39 C or trouble breathing",
    ),
    "a migraine": (
        ["a throbbing headache", "sensitivity to light", "nausea", "blurred vision"],
        "rest in a dark quiet room, keep a headache diary and avoid skipping meals",
        "sudden severe headache or weakness on one side",
    ),
    "acid reflux": (
        ["a burning feeling in the chest", "a sour taste in the mouth", "bloating", "pain after meals"],
        "eat smaller meals, avoid lying down after eating and cut down on spicy food",
        "trouble swallowing or black stools",
    ),
    "a muscle strain": (
        ["pain in the lower back", "stiffness in the morning", "pain when bending", "muscle spasms"],
        "apply ice for the first two days, then gentle heat, and keep moving gently",
        "numbness in the legs or loss of bladder control",
    ),
    "seasonal allergies": (
        ["itchy eyes", "a blocked nose", "sneezing", "watery eyes"],
        "keep windows closed in the pollen season and rinse your nose with saline",
        "wheezing or swelling of the face",
    ),
    "dehydration": (
        ["dizziness", "a dry mouth", "dark urine", "tiredness"],
        "drink water regularly through the day and add an oral rehydration solution",
        "confusion or fainting",
    ),
    "an ear infection": (
        ["ear pain", "a feeling of fullness in the ear", "muffled hearing", "a mild fever"],
        "use a warm compress and avoid getting water in the ear",
        "discharge from the ear or a high fever",
    ),
    "eczema": (
        ["dry itchy skin", "red patches on the elbows", "skin that cracks", "itching at night"],
        "moisturise twice a day, use mild soap and avoid scratching",
        "skin that oozes or crusts, which may mean infection",
    ),
}
DURATIONS = ["two days", "a week", "three weeks", "since yesterday", "about a month", "five days"]
OPENINGS = ["Hello doctor,", "Hi doctor,", "Dear doctor,", "Hello,"]


def generate(rng: random.Random) -> tuple[str, str, str]:
    condition = rng.choice(sorted(CONDITIONS))
    symptoms, advice, warning = CONDITIONS[condition]
    chosen = rng.sample(symptoms, rng.randint(2, 3))
    age, who = rng.randint(8, 80), rng.choice(["I am", "My father is", "My daughter is", "My wife is", "My son is"])
    subject = "I have" if who == "I am" else ("He has" if who in ("My father is", "My son is") else "She has")
    question = (
        f"{rng.choice(OPENINGS)} {who} {age} years old. {subject} had {', '.join(chosen[:-1])} and "
        f"{chosen[-1]} for {rng.choice(DURATIONS)}. What could it be and what should we do?"
    )
    answer = (
        f"Thank you for your question. {chosen[0].capitalize()} together with {chosen[-1]} is most often "
        f"caused by {condition}. I suggest that you {advice}. "
        f"Please see a doctor in person if you notice {warning}. I hope this helps."
    )
    return INSTRUCTION, question, answer
