"""The generator of the embedded default data: synthetic HCP-like, BraTS-like and ``structures``
subjects, drawn from the real template anatomy and written in the real datasets' layouts.

``generate.generate_default`` is the entry point; ``anatomy`` reads the templates, ``warp``,
``contrast`` and ``subjects`` draw a subject, ``ids`` names it and seeds its stream, ``write``
writes it and ``manifest`` records a generated folder's settings.
"""
