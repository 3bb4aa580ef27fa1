"""toy_data.py: the Quickstart's learnable tasks, written from the project's own word lists.

A torch-free support module, read beside replicate.py. A model small enough to train in a minute on a CPU
cannot learn real GLUE well enough to show anything, so the Quickstart's comparison runs on two toy tasks in
GLUE's layout and with GLUE's label words, which the shipped prompt files score like the real ones:

    sst2  a sentence about a film, positive or negative: its adjectives say which; in "although A, B" the
          main clause B decides (label 1: positive)
    cola  a short sentence, acceptable or not: unacceptable ones have no finite verb ("the dog chasing a
          ball", "the dog to chase a ball"), a doubled determiner, or the verb after its object (label 1:
          acceptable)

examples/toy_glue/ holds the output (sst2.jsonl, cola.jsonl) and templates.json, the training instructions
(written for these tasks, in FLAN's format). The files are rebuilt byte for byte by

    python toy_data.py --out examples/toy_glue --rows 3000 --seed 0
"""
import json
import random
from pathlib import Path

from files import write_atomically
from flags import COUNT, SEED, ArgumentParser, checked

SUBJECTS = ("the film", "this movie", "the story", "the acting", "the script", "the ending", "the music",
            "the cast", "the plot", "the dialogue", "the opening scene", "the sequel", "the lead actor",
            "the camera work", "the director's new picture", "the second half", "the humour", "the finale")
VERBS = ("is", "was", "felt", "seemed", "turned out to be", "remains", "looked")
INTENSIFIERS = ("", "", "truly ", "rather ", "really ", "quite ", "so ", "utterly ", "mostly ")
POSITIVE = ("wonderful", "brilliant", "charming", "delightful", "moving", "gripping", "funny", "beautiful",
            "clever", "warm", "thrilling", "fresh", "touching", "superb", "lovely", "inventive", "sharp",
            "heartfelt", "stunning", "joyful")
NEGATIVE = ("dull", "clumsy", "boring", "tedious", "lifeless", "messy", "forgettable", "bland", "silly",
            "shallow", "awkward", "tiresome", "hollow", "predictable", "sloppy", "flat", "dreary", "weak",
            "confusing", "painful")
TAILS = ("", "", " from start to finish", " in every scene", " for most of its length", " at times",
         " to my surprise", " as i expected")
NOUNS = (("dog", "dogs"), ("teacher", "teachers"), ("child", "children"), ("bird", "birds"),
         ("farmer", "farmers"), ("student", "students"), ("cat", "cats"), ("doctor", "doctors"),
         ("painter", "painters"), ("neighbour", "neighbours"), ("pilot", "pilots"), ("baker", "bakers"))
ACTIONS = (("chases", "chase", "chasing"), ("reads", "read", "reading"), ("finds", "find", "finding"),
           ("carries", "carry", "carrying"), ("paints", "paint", "painting"),
           ("watches", "watch", "watching"), ("opens", "open", "opening"), ("buys", "buy", "buying"),
           ("cleans", "clean", "cleaning"), ("drops", "drop", "dropping"), ("fixes", "fix", "fixing"),
           ("sells", "sell", "selling"))  # (singular, plural, -ing)
DETERMINERS = ("the", "a", "one", "that", "every")
OBJECTS = ("a ball", "the letter", "an old book", "the red door", "a small box", "the window", "some bread",
           "a new car", "the map", "a blue kite", "the old fence", "a warm coat")
PLACES = ("", "", " in the garden", " every morning", " after lunch", " near the river", " with great care",
          " on sunday")


def review(rng):
    """(sentence, label) for the toy sst2: label 1 when the sentence is positive."""
    label = rng.randrange(2)
    words = (NEGATIVE, POSITIVE)

    def clause(polarity):
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(INTENSIFIERS)}" + \
            rng.choice(words[polarity])
    kind = rng.random()
    if kind < 0.5:
        text = clause(label) + rng.choice(TAILS)
    elif kind < 0.75:
        text = clause(label) + f" and {rng.choice(words[label])}"
    else:  # the main clause decides: "although the plot was dull, the acting was superb"
        text = f"although {clause(1 - label)}, {clause(label)}"
    return text + " .", label


def grammar(rng):
    """(sentence, label) for the toy cola: label 1 when the sentence is acceptable."""
    plural, label, broken = rng.randrange(2), rng.randrange(2), rng.randrange(4)
    determiner = "the" if plural else rng.choice(DETERMINERS)
    action = rng.choice(ACTIONS)  # agreeing with the subject: chases / chase
    subject, verb = [determiner, rng.choice(NOUNS)[plural]], [action[plural]]
    rest = rng.choice(OBJECTS).split()
    if not label and broken == 0:  # no finite verb: "the dog chasing a ball"
        verb = [rng.choice(ACTIONS)[2]]
    elif not label and broken == 1:  # an infinitive instead: "the dog to chase a ball"
        verb = ["to", rng.choice(ACTIONS)[1]]
    elif not label and broken == 2:  # a doubled determiner: "the the dog chases a ball"
        subject = [determiner] + subject
    elif not label:  # the verb after its object: "the dog a ball chases"
        verb, rest = rest, verb
    return " ".join(subject + verb + rest + rng.choice(PLACES).split()) + " .", label


def write_task(path, make, rows, rng):
    lines = [json.dumps(dict(zip(("sentence", "label"), make(rng)), idx=i)) + "\n" for i in range(rows)]
    write_atomically(path, "".join(lines))


def main(argv=None):
    parser = ArgumentParser(description="Write the toy GLUE tasks (sst2, cola) of the Quickstart.")
    parser.add_argument("--out", default="examples/toy_glue", help="folder for sst2.jsonl and cola.jsonl")
    parser.add_argument("--rows", type=checked(int, COUNT), default=3000, help="rows per task")
    parser.add_argument("--seed", type=checked(int, SEED), default=0, help="seed of the draws")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for task, make in (("sst2", review), ("cola", grammar)):
        write_task(Path(args.out) / f"{task}.jsonl", make, args.rows, random.Random(f"{args.seed}:{task}"))
    print(f"wrote {args.rows} rows each to {args.out}/sst2.jsonl and {args.out}/cola.jsonl")


if __name__ == "__main__":
    main()
