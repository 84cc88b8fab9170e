"""Faces: detectors behind one interface (detectors), the 5-point template geometry (template), one aligned face
per photo (aligner), the alignment record (record), a whole folder of photos (folder) and raw photos seen through
the aligner as a data set (view).

Builds on facesiam.data (image decoding, folder listing, the shard writer); data/ never imports faces/.
"""
