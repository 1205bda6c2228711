package main

import (
	"time"

	"github.com/cabinet-kms/cabinet/transport"
)

// Gossip settings. They follow the server's configuration convention
// (CABINET_<FLAG> in the environment); registering them as `cabinet server`
// flags needs addGossipFlags in newServerCmd (see gossipSettings).
//
//	--gossip-addr / CABINET_GOSSIP_ADDR        bind+advertise address (default:
//	                                            the Raft IP, Raft port + 100, TCP and UDP)
//	--gossip-join / CABINET_GOSSIP_JOIN        extra gossip addresses to join (comma
//	                                            separated); members are otherwise found
//	                                            at their derived addresses
//	--autoremove-dead-after / CABINET_AUTOREMOVE_DEAD_AFTER
//	                                            leader removes voters gossip reports
//	                                            dead this long (0: off), never below 3
//	                                            voters nor below a majority of live ones
//	--gossip=false / CABINET_GOSSIP=false      disable gossip
type gossipSettings struct {
	addr            string
	join            []string
	autoremoveAfter time.Duration
	enabled         bool
}

func (g gossipSettings) transport() transport.GossipSettings {
	return transport.GossipSettings{Addr: g.addr, Join: g.join, AutoremoveAfter: g.autoremoveAfter, Enabled: g.enabled}
}
