"""toy_data.py: the Quickstart's toy tasks, where only the instruction says what to answer.

A torch-free support module, read beside replicate.py. A model small enough to train in a minute on a CPU
cannot learn real GLUE well enough to show anything, so the Quickstart's comparison runs on two toy tasks in
GLUE's layout and with GLUE's label words, which the shipped prompt files score like the real ones. Both
tasks ask about the same sentences, one short remark about a film each:

    sst2  is the remark positive or negative? Its adjectives say which; in "although A, B" the main clause
          B decides (label 1: positive)
    cola  is it grammatical? An unacceptable remark has one broken clause: no finite verb ("the plot being
          dull"), an infinitive ("the plot to be dull"), a doubled determiner ("the the plot was dull") or
          the verb last ("the plot dull was") (label 1: acceptable)

Sentiment and grammar are drawn independently, and sst2.jsonl and cola.jsonl hold the same sentences in the
same order, so a model can tell which label is asked only by reading the instruction: the setting in which
CoIN's question, does an unseen wording of the instruction change the answer, can be asked at all. (On two
tasks with different inputs, the input alone gives the task away and the instruction never matters.)

examples/toy_glue/ holds the output (sst2.jsonl, cola.jsonl) and templates.json, the training instructions
(written for these tasks, in FLAN's format). The files are rebuilt byte for byte by

    python toy_data.py --out examples/toy_glue --rows 4000 --seed 0
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
BREAKS = ("no verb", "infinitive", "doubled", "verb last")  # what makes a clause unacceptable


def clause(rng, polarity, broken=None):
    """A clause about a film, positive (polarity 1) or negative, grammatical unless `broken` is one of
    BREAKS."""
    subject, verb = rng.choice(SUBJECTS).split(), rng.choice(VERBS).split()
    complement = (rng.choice(INTENSIFIERS) + rng.choice((NEGATIVE, POSITIVE)[polarity])).split()
    if broken == "no verb":  # "the plot being dull"
        verb = ["being"]
    elif broken == "infinitive":  # "the plot to be dull"
        verb = ["to", "be"]
    elif broken == "doubled":  # "the the plot was dull"
        subject = subject[:1] + subject
    elif broken == "verb last":  # "the plot dull was"
        return " ".join(subject + complement + verb)
    return " ".join(subject + verb + complement)


def remark(rng):
    """(sentence, sentiment, acceptable), sentiment and grammar drawn independently (1: positive, 1:
    acceptable). An unacceptable remark has one broken clause; in "although A, B" either may be it."""
    sentiment, acceptable, kind = rng.randrange(2), rng.randrange(2), rng.random()
    broken = None if acceptable else rng.choice(BREAKS)
    if kind < 0.5:
        text = clause(rng, sentiment, broken) + rng.choice(TAILS)
    elif kind < 0.75:
        text = clause(rng, sentiment, broken) + f" and {rng.choice((NEGATIVE, POSITIVE)[sentiment])}"
    else:  # the main clause decides the sentiment: "although the plot was dull, the acting was superb"
        first, second = rng.sample([broken, None], 2)
        text = f"although {clause(rng, 1 - sentiment, first)}, {clause(rng, sentiment, second)}"
    return text + " .", sentiment, acceptable


def main(argv=None):
    parser = ArgumentParser(description="Write the toy GLUE tasks (sst2, cola) of the Quickstart.")
    parser.add_argument("--out", default="examples/toy_glue", help="folder for sst2.jsonl and cola.jsonl")
    parser.add_argument("--rows", type=checked(int, COUNT), default=4000, help="rows (sentences) per task")
    parser.add_argument("--seed", type=checked(int, SEED), default=0, help="seed of the draws")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{args.seed}:toy")
    remarks = [remark(rng) for _ in range(args.rows)]
    for task, column in (("sst2", 1), ("cola", 2)):  # the same sentences, each task's own label
        lines = [json.dumps(dict(sentence=r[0], label=r[column], idx=i)) for i, r in enumerate(remarks)]
        write_atomically(Path(args.out) / f"{task}.jsonl", "".join(line + "\n" for line in lines))
    print(f"wrote {args.rows} sentences, labelled for each task, to {args.out}/sst2.jsonl and cola.jsonl")


if __name__ == "__main__":
    main()
