"""Operations the methods share: boxes (RoIAlign, NMS, pasting), the class-agnostic segmenter, GrabCut, and the
mask metrics of the evaluation protocol."""
