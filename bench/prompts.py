"""Prompts built against the server's own tokenizer, so lengths are in its
tokens and "cold" prompts share no cached prefix with anything sent before."""

import random
from typing import List

import backend_pb2

WORDS = ("the of and to in is was for on that with as by at from his her an they which "
         "river mountain city garden window morning evening winter summer market harbor "
         "teacher doctor farmer sailor painter writer engineer student child friend "
         "walked carried opened watched followed remembered built crossed painted wrote "
         "quiet bright ancient narrow golden heavy gentle sudden distant careful "
         "bridge lantern letter journey forest island village castle station library "
         "because although while after before until during between through across "
         "small large old new long short warm cold early late green blue red white "
         "bread water stone paper music light shadow voice story question answer").split()

# Openers for prompts that must share no first token with anything sent before
# (a cold prompt cache: the server reuses any shared prefix, even one token).
OPENERS = ("Aardvark Bicycle Cathedral Dinosaur Elephant Flamingo Giraffe Harmonica "
           "Iceberg Jaguar Kangaroo Lighthouse Mandolin Nebula Octopus Penguin Quartz "
           "Raccoon Saxophone Tornado Umbrella Volcano Walrus Xylophone Yacht Zeppelin "
           "Avocado Blizzard Cactus Dolphin Eclipse Falcon Glacier Hedgehog Igloo Jellyfish "
           "Koala Lemur Meteor Narwhal Orchid Pelican Quokka Rhinoceros Sapphire Toucan "
           "Unicorn Vulture Wombat Yeti Zucchini 7 8 9 # @ ( [ { < ~ ! ? * + = / ; : % & "
           "a b c d e f g h i j k l m n o p q r s t u v w x y z").split()


def filler(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        w = rng.choice(WORDS)
        out.append(w.capitalize() if i % 12 == 0 else w)
        if i % 12 == 11:
            out[-1] += "."
    return " ".join(out)


class PromptBook:
    """Builds prompts against the server's own tokenizer (TokenizeString).

    Every prompt sent to a server should come from its book: the book remembers
    first tokens, so a `cold` prompt can be made to share no prefix at all with
    anything the server may have cached.
    """

    def __init__(self, stub, seed: int = 1234):
        self.stub = stub
        self.rng = random.Random(seed)
        self.used_first = set()
        self._openers = list(OPENERS)

    def tokens(self, text: str) -> List[int]:
        return list(self.stub.TokenizeString(backend_pb2.PredictOptions(Prompt=text),
                                             timeout=60).tokens)

    def register(self, text: str) -> str:
        toks = self.tokens(text)
        if toks:
            self.used_first.add(toks[0])
        return text

    def plain(self, i: int, words: int = 16) -> str:
        """A distinct ordinary prompt (all share the opener 'Story')."""
        return self.register(f"Story {i}: {filler(self.rng, words)}")

    def text_of_tokens(self, n: int) -> str:
        """Filler text of about n tokens (measured with the server's tokenizer)."""
        seed = self.rng.random()
        lo, hi = 1, max(4, n // 2)
        while len(self.tokens(filler(random.Random(seed), hi))) < n:
            lo, hi = hi, hi * 2
        while lo < hi:  # fewest words reaching n tokens
            mid = (lo + hi) // 2
            if len(self.tokens(filler(random.Random(seed), mid))) >= n:
                hi = mid
            else:
                lo = mid + 1
        return filler(random.Random(seed), lo)

    def cold(self, body: str) -> str:
        """`body` behind an opener whose first token the server has never seen."""
        while self._openers:
            opener = self._openers.pop(0)
            text = f"{opener} {body}"
            toks = self.tokens(text)
            if toks and toks[0] not in self.used_first:
                self.used_first.add(toks[0])
                return text
        raise RuntimeError("ran out of openers with a fresh first token")
