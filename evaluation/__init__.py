"""Offline evaluation of the streaming recommender: the prequential evaluator, the streaming peer
baselines, the dataset loaders (MovieLens, event files) and the synthetic stream generator. All of
it runs the same learner code (models/) as the workers; nothing in models/ imports from here.
"""
