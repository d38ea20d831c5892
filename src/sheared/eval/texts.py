"""Short real texts (public domain) used by the demo, the parity tests and export verification."""

# Jane Austen, Pride and Prejudice (1813), chapter 1, opening.
AUSTEN = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered as the rightful property of some one or other of their "
    'daughters. "My dear Mr. Bennet," said his lady to him one day, "have you heard that '
    'Netherfield Park is let at last?" Mr. Bennet replied that he had not.'
)

# Charles Darwin, On the Origin of Species (1859), chapter 3, on the struggle for existence.
DARWIN = (
    "It is good thus to try in our imagination to give any form some advantage over another. "
    "Probably in no single instance should we know what to do, so as to succeed. It will convince us "
    "of our ignorance on the mutual relations of all organic beings; a conviction as necessary, as it "
    "seems to be difficult to acquire. All that we can do, is to keep steadily in mind that each "
    "organic being is striving to increase at a geometrical ratio; that each at some period of its "
    "life, during some season of the year, during each generation or at intervals, has to struggle "
    "for life, and to suffer great destruction."
)

REAL_TEXTS = (AUSTEN, DARWIN)
