"""Data: clip sampling, transforms, DFEW/AFEW-layout data sets, video decoding, synthetic faces."""
