"""`concept_mask`: Concept Mask (seed 001): PMI tag vectors (`pmi`), the embedding network (`embedding_net`),
the attention model at run time (`attention`), its losses (`losses`) and the method (`method`)."""

from ovseg.core.methods.concept_mask.method import ConceptMask  # noqa: F401
