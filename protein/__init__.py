"""superdiff.protein"""
