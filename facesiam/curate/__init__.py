"""Know your data: the data doctor (findings about a user's folders, quarantine and undo) and clustering of
unlabelled photos into people. Floor 3: it embeds with eval/ and searches with eval/gallery."""
