"""evals/metrics"""
