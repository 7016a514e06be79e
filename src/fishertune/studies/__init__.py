"""Studies run by the experiment runner by name (:mod:`fishertune.experiments.study`): each a
package with its own data, statistics and report."""
