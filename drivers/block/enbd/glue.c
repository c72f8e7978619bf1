// SPDX-License-Identifier: GPL-2.0
/*
 * enbd C glue: module parameters, block_device_operations and two macros.
 * Kept minimal on purpose; the driver's logic is in Rust.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/pagemap.h>
#include <linux/writeback.h>
#include "glue.h"

struct enbd_int_param {
	int val;
	int min;
	int max;
};

static int enbd_param_set(const char *arg, const struct kernel_param *kp)
{
	struct enbd_int_param *p = kp->arg;
	int v, err;

	err = kstrtoint(arg, 0, &v);
	if (err) {
		pr_err("enbd: %s=%s is not an integer\n", kp->name, arg);
		return err;
	}
	if (v < p->min || v > p->max) {
		pr_err("enbd: %s=%d is out of range %d..%d\n", kp->name, v,
		       p->min, p->max);
		return -EINVAL;
	}
	WRITE_ONCE(p->val, v);
	return 0;
}

static int enbd_param_get(char *buf, const struct kernel_param *kp)
{
	const struct enbd_int_param *p = kp->arg;

	return sysfs_emit(buf, "%d\n", READ_ONCE(p->val));
}

static const struct kernel_param_ops enbd_param_ops = {
	.set = enbd_param_set,
	.get = enbd_param_get,
};

#define ENBD_PARAM(name, def, lo, hi, perm, desc)                             \
	static struct enbd_int_param enbd_p_##name = { def, lo, hi };         \
	module_param_cb(name, &enbd_param_ops, &enbd_p_##name, perm);         \
	MODULE_PARM_DESC(name, desc " [" #lo ".." #hi ", default " #def "]")

ENBD_PARAM(nr_devices, 4, 1, 256, 0444, "number of /dev/enbdN devices");
ENBD_PARAM(max_channels, 8, 1, 64, 0444, "sockets per device");
ENBD_PARAM(queue_depth, 128, 1, 1024, 0444, "requests in flight per device");
ENBD_PARAM(max_sectors_kb, 1024, 4, 32768, 0444,
	   "largest request in KiB (further capped by the server)");
ENBD_PARAM(request_timeout, 30, 1, 3600, 0644,
	   "seconds before an unanswered request is resubmitted");
ENBD_PARAM(dead_timeout, 0, 0, 86400, 0644,
	   "seconds requests wait for a channel before failing; 0 waits forever");
ENBD_PARAM(keepalive_interval, 10, 0, 3600, 0644,
	   "seconds of quiet before a channel is probed; 0 disables");
ENBD_PARAM(max_resubmits, 8, 0, 16, 0644,
	   "resubmissions of one request before it fails with EIO");

int enbd_param(enum enbd_param_id id)
{
	switch (id) {
	case ENBD_PARAM_NR_DEVICES:
		return READ_ONCE(enbd_p_nr_devices.val);
	case ENBD_PARAM_MAX_CHANNELS:
		return READ_ONCE(enbd_p_max_channels.val);
	case ENBD_PARAM_QUEUE_DEPTH:
		return READ_ONCE(enbd_p_queue_depth.val);
	case ENBD_PARAM_MAX_SECTORS_KB:
		return READ_ONCE(enbd_p_max_sectors_kb.val);
	case ENBD_PARAM_REQUEST_TIMEOUT:
		return READ_ONCE(enbd_p_request_timeout.val);
	case ENBD_PARAM_DEAD_TIMEOUT:
		return READ_ONCE(enbd_p_dead_timeout.val);
	case ENBD_PARAM_KEEPALIVE_INTERVAL:
		return READ_ONCE(enbd_p_keepalive_interval.val);
	case ENBD_PARAM_MAX_RESUBMITS:
		return READ_ONCE(enbd_p_max_resubmits.val);
	}
	return 0;
}

const struct block_device_operations enbd_fops = {
	.owner = THIS_MODULE,
	.ioctl = enbd_rust_ioctl,
};

unsigned int enbd_rq_segments(struct request *rq, unsigned int skip,
			      struct bio_vec *vecs, unsigned int max)
{
	struct req_iterator iter;
	struct bio_vec bv;
	unsigned int i = 0, n = 0;

	rq_for_each_segment(bv, rq, iter) {
		if (i++ < skip)
			continue;
		if (n == max)
			break;
		vecs[n++] = bv;
	}
	return n;
}

struct gendisk *enbd_alloc_disk(struct blk_mq_tag_set *set,
				struct queue_limits *lim, void *queuedata)
{
	return blk_mq_alloc_disk(set, lim, queuedata);
}

void enbd_start_writeback(struct block_device *bdev, long nr_pages)
{
	struct writeback_control wbc = {
		.sync_mode = WB_SYNC_NONE,
		.nr_to_write = nr_pages,
		.range_start = 0,
		.range_end = LLONG_MAX,
	};

	filemap_fdatawrite_wbc(bdev->bd_mapping, &wbc);
}

bool enbd_writeback_pending(struct block_device *bdev)
{
	struct address_space *m = bdev->bd_mapping;

	return mapping_tagged(m, PAGECACHE_TAG_DIRTY) ||
	       mapping_tagged(m, PAGECACHE_TAG_WRITEBACK);
}
