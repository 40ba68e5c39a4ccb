"""superdiff.pipelines"""
