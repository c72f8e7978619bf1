/* SPDX-License-Identifier: GPL-2.0 */
/*
 * enbd's C glue: only what Rust cannot express in 6.12 (macros that emit
 * sections or static data). Everything else is Rust; see sys.rs.
 */
#ifndef ENBD_GLUE_H
#define ENBD_GLUE_H

#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/bvec.h>

/* Module parameters; values are range-checked when set (insmod or sysfs). */
enum enbd_param_id {
	ENBD_PARAM_NR_DEVICES,
	ENBD_PARAM_MAX_CHANNELS,
	ENBD_PARAM_QUEUE_DEPTH,
	ENBD_PARAM_MAX_SECTORS_KB,
	ENBD_PARAM_REQUEST_TIMEOUT,
	ENBD_PARAM_DEAD_TIMEOUT,
	ENBD_PARAM_KEEPALIVE_INTERVAL,
	ENBD_PARAM_MAX_RESUBMITS,
};

int enbd_param(enum enbd_param_id id);

/* Block device operations with .owner = THIS_MODULE; calls the Rust side. */
extern const struct block_device_operations enbd_fops;

/*
 * Copies up to @max single-page segments of @rq, after skipping the first
 * @skip, into @vecs. Returns the number copied (0 at the end).
 */
unsigned int enbd_rq_segments(struct request *rq, unsigned int skip,
			      struct bio_vec *vecs, unsigned int max);

/* blk_mq_alloc_disk() is a macro with a static lock class. */
struct gendisk *enbd_alloc_disk(struct blk_mq_tag_set *set,
				struct queue_limits *lim, void *queuedata);

/*
 * Starts writeback of at most @nr_pages dirty pages of @bdev's page cache
 * without waiting for any of it (WB_SYNC_NONE), so the caller never sleeps
 * on a page a dead channel will not finish. Keeping @nr_pages within the
 * free request slots keeps it from waiting for a tag.
 */
void enbd_start_writeback(struct block_device *bdev, long nr_pages);

/* Whether @bdev's page cache has dirty pages or pages under writeback. */
bool enbd_writeback_pending(struct block_device *bdev);

/* Implemented in Rust (sys.rs). */
int enbd_rust_ioctl(struct block_device *bdev, blk_mode_t mode,
		    unsigned int cmd, unsigned long arg);

#endif
