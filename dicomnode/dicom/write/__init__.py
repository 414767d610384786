"""Results -> DICOM: SEG (highdicom), derived PET and derived CT (pydicom)."""
