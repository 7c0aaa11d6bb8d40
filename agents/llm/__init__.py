"""The AI service layer: one interface over all providers.

Entry points (see service.py): `complete(request)` and `stream(request)`.
"""
