//! Encoding requests: Query Config broadcasts and ATA frames for outstanding ops.

use super::*;

impl Engine {
    pub(super) fn queue_config_query(
        &mut self,
        now: Instant,
        iface: usize,
        dst: MacAddr,
        addr: TargetAddr,
    ) {
        let Some(local) = self.interfaces.get(&iface) else {
            return;
        };
        let src = local.mac;
        let tag = self.new_tag(now);
        let msg = Message {
            header: HeaderRepr::request(dst, src, addr, Command::QueryConfig, Tag(tag)),
            body: Body::Config(ConfigRepr::request(ConfigCommand::Read, b"")),
        };
        if let Ok(v) = msg.to_vec() {
            self.transmit.push_back((iface, v, None));
        }
    }

    /// Builds the ATA request for frame `f` under `tag` and queues it.
    pub(super) fn emit_frame(&mut self, tag: u32, f: &Outstanding) {
        let (Some(d), Some(op), Some(local)) = (
            self.devices.get_mut(&f.dev),
            self.ops.get(&f.op),
            self.interfaces.get(&f.iface),
        ) else {
            return;
        };
        let lba = op.lba + f.offset;
        // A write's sectors: not copied into the frame, but sent from the write's buffer
        // behind the headers ([`TxFrame`]).
        let mut tail = None;
        let (cmd, aflags) = match &op.kind {
            OpKind::Read(_) | OpKind::Probe => (
                if d.lba48 {
                    AtaCommand::ReadSectorsExt
                } else {
                    AtaCommand::ReadSectors
                },
                AtaFlags::empty(),
            ),
            OpKind::Write(buf) => {
                let start = f.offset as usize * SECTOR_SIZE;
                let end = start + f.count as usize * SECTOR_SIZE;
                if end <= buf.len() && start < end {
                    tail = Some(TxData {
                        buf: buf.clone(),
                        start,
                        end,
                    });
                }
                (
                    if d.lba48 {
                        AtaCommand::WriteSectorsExt
                    } else {
                        AtaCommand::WriteSectors
                    },
                    AtaFlags::WRITE,
                )
            }
            // libata's choice (`ata_id_has_flush_ext`): FLUSH CACHE EXT only when IDENTIFY
            // word 83 bit 13 advertises it, not merely because the device is LBA48. vblade
            // advertises LBA48 and FLUSH CACHE (word 83 = 0x5400) but aborts 0xEA.
            OpKind::Flush => (
                if d.identify.as_ref().is_some_and(|i| i.flush_cache_ext) {
                    AtaCommand::FlushCacheExt
                } else {
                    AtaCommand::FlushCache
                },
                AtaFlags::empty(),
            ),
            OpKind::Identify | OpKind::Verify => (AtaCommand::IdentifyDevice, AtaFlags::empty()),
        };
        let data_cmd = matches!(op.kind, OpKind::Read(_) | OpKind::Write(_) | OpKind::Probe);
        let lba = if data_cmd { lba } else { 0 };
        let (aflags, lba_field) = match op.kind {
            // `ata_id`: lba3 = 0xa0 (device register, LBA bit clear).
            OpKind::Identify | OpKind::Verify => (aflags, 0xa0u64 << 24),
            _ if d.lba48 => (aflags | AtaFlags::EXTENDED, lba),
            // `put_lba` for LBA28: lba3 = (lba3 & 0x0f) | 0xe0.
            _ => (aflags, (lba & 0x0fff_ffff) | (0xe0 << 24)),
        };
        let msg = Message {
            header: HeaderRepr::request(f.target, local.mac, f.dev, Command::Ata, Tag(tag)),
            body: Body::Ata(AtaRepr {
                aflags,
                err_feature: 0,
                sector_count: f.count,
                cmd_status: u8::from(cmd),
                lba: lba_field,
                data: &[],
            }),
        };
        // Every copy of a write fences its sectors until answered or presumed gone.
        let fence = (self.cfg.fence_writes && matches!(op.kind, OpKind::Write(_))).then(|| {
            let rto = d
                .target_idx(f.target)
                .map_or(self.cfg.rto_min, |ti| d.targets[ti].rto(&self.cfg));
            Fence {
                dev: f.dev,
                op: f.op,
                lba,
                end: lba + u64::from(f.count),
                gone_at: f.sent + super::retransmit::SILENT_HOLD.max(rto),
            }
        });
        let mut buf = self.spare.pop().unwrap_or_default();
        // `Message::emit` writes every byte up to the length it returns (header, ATA
        // arguments, data, padding), so a reused buffer's old bytes never reach the wire
        // and only growth past its old length is zeroed.
        buf.resize(msg.buffer_len(), 0);
        match msg.emit(&mut buf) {
            Ok(n) => {
                // With data behind them the headers need no padding: the frame is longer
                // than the Ethernet minimum.
                buf.truncate(if tail.is_some() {
                    msg.unpadded_len()
                } else {
                    n
                });
                d.stats.frames_sent += 1;
                self.transmit.push_back((f.iface, buf, tail));
                if let Some(fence) = fence {
                    self.fence_ends.push(fence.gone_at, tag);
                    if self.fences.insert(tag, fence).is_some() {
                        self.trim_fences();
                    }
                }
            }
            Err(_) => self.recycle_frame(buf),
        }
    }
}
