"""superdiff.ui"""
