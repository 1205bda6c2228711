package main

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/cabinet-kms/cabinet/cluster"
)

// gossipCollector exports gossip's view of the members: how many Raft
// members gossip sees in each state.
type gossipCollector struct {
	members func() map[string]int
	desc    *prometheus.Desc
}

func newGossipCollector(members func() map[string]int) *gossipCollector {
	return &gossipCollector{members: members, desc: prometheus.NewDesc("cabinet_gossip_members",
		"Raft configuration members by gossip state (alive, suspect, dead, unknown).", []string{"state"}, nil)}
}

func (c *gossipCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *gossipCollector) Collect(ch chan<- prometheus.Metric) {
	m := c.members()
	for _, st := range []string{cluster.GossipAlive, cluster.GossipSuspect, cluster.GossipDead, cluster.GossipUnknown} {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(m[st]), st)
	}
}
